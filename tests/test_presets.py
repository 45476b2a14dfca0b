"""The provider presets: frozen, complete, and importable by the stdlib-only helper."""

from __future__ import annotations

import ast
import dataclasses
import sys
from pathlib import Path

import pytest

from mailoauthd import presets

PRESETS_PY = Path(presets.__file__)


def test_presets_import_only_the_standard_library() -> None:
    """The helper may read presets; it imports nothing but the standard library."""
    tree = ast.parse(PRESETS_PY.read_text(encoding="utf-8"))
    modules = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level == 0
    }
    assert modules <= set(sys.stdlib_module_names) | {"__future__"}


@pytest.mark.parametrize("preset", presets.PRESETS.values(), ids=lambda p: p.name)
def test_every_preset_fills_its_templates(preset: presets.Preset) -> None:
    """Each cloud's endpoints and scopes come out with no placeholder left."""
    for cloud in [*preset.clouds, None]:
        values = presets.defaults(preset, None, cloud)
        texts = [str(values[key]) for key in presets.ENDPOINT_KEYS if key in values]
        texts += list(presets.app_only_scopes(preset, cloud) or ())
        assert not [text for text in [*texts, *values["scopes"]] if "{" in text]  # type: ignore[misc]
        assert all(text.startswith("https://") for text in texts)


def test_presets_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        presets.GOOGLE.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        presets.PRESETS["x"] = presets.GOOGLE  # type: ignore[index]
    with pytest.raises(TypeError):
        presets.GOOGLE.authorize_params["prompt"] = "none"  # type: ignore[index]


def test_the_generic_preset_knows_nothing() -> None:
    generic = presets.PRESETS[presets.GENERIC]
    assert presets.defaults(generic, None, None) == {"scopes": ()}
    assert presets.mail_servers(generic, None) is None
