"""
The files an installation ships besides the code: the example configuration, the
systemd units, the man pages and the shell completions.

A wheel installs them under `PREFIX/share/` (pyproject.toml's data-files): the
example and the units in `share/mailoauthd/`, the man pages in `share/man/`, the
completions where bash, zsh and fish look for them. A checkout has them at their
source paths (etc/, systemd/, share/).
"""

from __future__ import annotations

import site
import sys
import sysconfig
from pathlib import Path

from mailoauthd.errors import MailoauthdError

CHECKOUT = Path(__file__).resolve().parent.parent


def _prefixes() -> list[Path]:
    """Where pip may have put the data files: this environment's prefix, then the user's."""
    found: list[Path] = []
    for candidate in (
        sysconfig.get_path("data"),
        sys.prefix,
        sysconfig.get_path("data", f"{sysconfig.get_default_scheme()}"),
        getattr(site, "USER_BASE", None),
    ):
        if candidate and Path(candidate) not in found:
            found.append(Path(candidate))
    return found


def find(installed: str, checkout: str) -> Path:
    """
    A shipped file: in the checkout this runs from, else under an installation prefix.

    The checkout comes first: an editable install also copies the files under its
    prefix, and those copies go stale as the checkout changes.

    Args:
        installed: its path below the prefix, e.g. "share/mailoauthd/mailoauthd.toml".
        checkout: its path in a checkout, e.g. "etc/mailoauthd.toml".

    Raises:
        MailoauthdError: neither is there.
    """
    places = [CHECKOUT / checkout] + [prefix / installed for prefix in _prefixes()]
    for place in places:
        if place.is_file():
            return place
    raise MailoauthdError(
        f"cannot find {installed}: looked in {', '.join(str(p) for p in places)}",
        hint="reinstall mailoauthd from its wheel or a checkout",
    )


def example_config() -> str:
    """The annotated example configuration, as shipped."""
    return find("share/mailoauthd/mailoauthd.toml", "etc/mailoauthd.toml").read_text("utf-8")
