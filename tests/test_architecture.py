"""
docs/architecture.md's layers hold for the real imports.

The document's `layers` block lists the layers top to bottom, each with its packages
(`proxy/`) and modules (`refresh/scheduler.py`). Every module of mailoauthd must belong to
exactly one layer, and import (lazy imports inside functions and TYPE_CHECKING imports
included: they are still a dependency a reader must know) only its own layer and the
layers below. A listed `refresh/scheduler.py` is mailoauthd/refresh/scheduler.py; one that
does not exist fails the check.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mailoauthd

PACKAGE = Path(mailoauthd.__file__).parent
DOC = PACKAGE.parent / "docs" / "architecture.md"

# Imports that go up against the layers, each with why it is there. Each must still occur
# (the test fails when one no longer does, so the list can only shrink) and no other may.
# The pairs are written as the document names modules.
UP_IMPORTS: dict[tuple[str, str], str] = {}


def layer_entries() -> list[tuple[str, list[str]]]:
    """The document's layers, top to bottom: (layer name, its entries)."""
    text = DOC.read_text(encoding="utf-8")
    block = re.search(r"^```layers\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert block is not None, "docs/architecture.md has no ```layers block"
    layers = []
    for line in block.group(1).splitlines():
        line = line.split("#", 1)[0].strip()
        if ":" in line:  # "name: entries"; a line without a name continues the layer above
            name, _, entries = line.partition(":")
            layers.append((name.strip(), entries.split()))
        elif line:
            layers[-1][1].extend(line.split())
    return layers


def resolve(entry: str) -> Path:
    """A listed `package/module.py`, `package/` or `module.py`, below mailoauthd/."""
    return PACKAGE / entry


def module_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def layer_of() -> dict[Path, int]:
    """Each module file's layer (0 = top); every file in exactly one layer."""
    owners: dict[Path, list[int]] = {}
    files = module_files()
    for index, (_, entries) in enumerate(layer_entries()):
        for entry in entries:
            path = resolve(entry)
            assert path.exists(), f"docs/architecture.md lists {entry}, which does not exist"
            covered = [f for f in files if f.is_relative_to(path)] if path.is_dir() else [path]
            for file in covered:
                owners.setdefault(file, []).append(index)
    for file in files:
        if file not in owners and file.name == "__init__.py":
            # A package's face (refresh/__init__.py) joins its modules' layer.
            inside = {owners[f][0] for f in files if f.parent == file.parent and f in owners}
            if len(inside) == 1:
                owners[file] = list(inside)
    problems = {str(f.relative_to(PACKAGE)): o for f, o in owners.items() if len(o) != 1}
    missing = [str(f.relative_to(PACKAGE)) for f in files if f not in owners]
    assert missing == [], f"modules in no layer of docs/architecture.md: {missing}"
    assert problems == {}, f"modules in more than one layer: {problems}"
    return {f: o[0] for f, o in owners.items()}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(path: Path, names: dict[str, Path]) -> set[Path]:
    """The files of ours one module imports, wherever in it the import statement is."""
    current = module_name(path)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = current.split(".")
                if path.name != "__init__.py":
                    parts.pop()
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in names else base)
    return {names[name] for name in found if name in names} - {path}


def up_imports() -> set[tuple[Path, Path]]:
    layers = layer_of()
    names = {module_name(f): f for f in module_files()}
    return {
        (importer, target)
        for importer in module_files()
        for target in imported(importer, names)
        if layers[target] < layers[importer]
    }


def shown(pairs: set[tuple[Path, Path]]) -> list[str]:
    return sorted(f"{a.relative_to(PACKAGE)} -> {b.relative_to(PACKAGE)}" for a, b in pairs)


def test_every_module_in_one_layer() -> None:
    layers = layer_of()
    assert len(layers) == len(module_files())


def test_imports_point_down() -> None:
    """No module imports a layer above its own, apart from the listed exceptions."""
    allowed = {(resolve(a), resolve(b)) for a, b in UP_IMPORTS}
    actual = up_imports()
    assert shown(actual - allowed) == [], "imports against docs/architecture.md's layers"
    assert shown(allowed - actual) == [], "exceptions that no longer occur: remove them"


def test_exceptions_are_in_the_document() -> None:
    """The document names every import that goes against its layers."""
    text = DOC.read_text(encoding="utf-8")
    for importer, target in UP_IMPORTS:
        assert f"`{importer}` → `{target}`" in text, (importer, target)


# Loaded when used, not at start: the proxy when [proxy] configures it, cryptography
# when a key seals the store, the sign-in (with h11) at the first `authorize`.
LOADED_WHEN_USED = ("mailoauthd.proxy", "cryptography", "h11", "mailoauthd.authorization")


@pytest.mark.integration
def test_a_start_loads_only_what_it_uses() -> None:
    """What the daemon imports to start (cli, daemon) leaves out what most starts never use."""
    script = (
        "import sys, mailoauthd.cli, mailoauthd.daemon\n"
        f"print(*sorted(m for m in sys.modules if m.startswith({LOADED_WHEN_USED!r})))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.split()
    assert loaded == []


# Text templates filled in later (a preset's explanations; the sign-in page's HTML).
SPELLS_COMMANDS_AS_TEXT = ("presets.py", "signin_page.py")


def test_hints_name_commands_through_one_home() -> None:
    """A hint's command ("run 'mailoauth authorize work'") is errors.helper_command's."""
    by_hand = re.compile(r"'mailoauth \w+ \{")
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{number}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name not in SPELLS_COMMANDS_AS_TEXT
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if by_hand.search(line)
    ]
    assert found == []
