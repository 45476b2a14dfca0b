"""The client recipes, read from docs/clients/*.md, so that what is tested is what is documented."""

from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs" / "clients"
# Where the docs' example account lives, and what the suite puts there instead.
DOC_USER = "alice@contoso.com"


def recipe(page: str, name: str) -> str:
    """The fenced block after `<!-- recipe: NAME -->` on docs/clients/PAGE.md."""
    text = (DOCS / f"{page}.md").read_text(encoding="utf-8")
    pattern = rf"<!-- recipe: {re.escape(name)} -->\n```[a-z]*\n(.*?)\n```"
    found = re.findall(pattern, text, flags=re.DOTALL)
    assert len(found) == 1, f"docs/clients/{page}.md has {len(found)} recipes named {name!r}"
    return str(found[0]) + "\n"


def adapt(text: str, *replacements: tuple[str, str], append: str = "") -> str:
    """
    The recipe with each (old, new) replaced, and `append` added.

    Each `old` must be in the recipe: a page that changed fails the test loudly
    instead of being tested with settings it no longer shows.
    """
    for old, new in replacements:
        assert old in text, f"the recipe no longer contains {old!r}:\n{text}"
        text = text.replace(old, new)
    return text + append
