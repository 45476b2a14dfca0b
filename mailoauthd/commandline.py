"""
What the programs' argument parsers say, read once for the man pages and the completions.

`mailoauth` (helper/commands.py) and `mailoauthd` (cli.py) each build an argparse
parser that `--help` prints; manpages.py and completions.py turn what it holds into
roff and shell code through these plain records, so that neither reads argparse's
internals on its own.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

# What the generated files name as their source: `make man` runs this module's caller.
GENERATOR = "mailoauthd/manpages.py"
# Subcommands of `mailoauth` whose one positional argument is an account name.
_ACCOUNT_POSITIONALS = ("account",)


@dataclass
class Option:
    """One option: its flags, the value it takes, and what completes that value."""

    flags: list[str]
    metavar: str | None  # None: a flag without a value
    help: str
    choices: list[str] = field(default_factory=list)
    files: bool = False  # its value is a path
    optional: str = ""  # "[=SECONDS]": a value that may follow '='


@dataclass
class Command:
    """One subcommand: its usage line, options and positional arguments."""

    name: str
    help: str
    usage: str
    options: list[Option]
    positionals: list[tuple[str, str]]  # (dest, help)
    takes_account: bool
    # A positional before the account with a fixed set of values: `recipe CLIENT ACCOUNT`.
    first_choices: list[str] = field(default_factory=list)


def _expand(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if not action.help or action.help == argparse.SUPPRESS:
        return ""
    return parser._get_formatter()._expand_help(action)


def _options(parser: argparse.ArgumentParser) -> list[Option]:
    found = []
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        # An optional value (`--wait[=SECONDS]`) is written with '=': completions offer none.
        takes_value = action.nargs not in (0, "?")
        metavar = None
        optional = f"[={action.metavar}]" if action.nargs == "?" else ""
        if takes_value:
            metavar = str(action.metavar or action.dest.upper())
            if action.choices:
                metavar = "|".join(str(c) for c in action.choices)
        found.append(
            Option(
                flags=list(action.option_strings),
                metavar=metavar,
                help=_expand(parser, action),
                choices=[str(c) for c in action.choices or ()],
                files=metavar in ("PATH", "DIR"),
                optional=optional,
            )
        )
    return found


def subcommands(parser: argparse.ArgumentParser) -> tuple[list[Option], list[Command]]:
    """The program's own options, and its subcommands with theirs."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help or "" for a in sub._choices_actions}
    commands = []
    for name, child in sub.choices.items():
        positionals = [
            (a.dest, _expand(child, a))
            for a in child._actions
            if not a.option_strings and not isinstance(a, argparse._SubParsersAction)
        ]
        commands.append(
            Command(
                name=name,
                help=helps.get(name, ""),
                usage=" ".join(child.format_usage().split()[1:]),
                options=[o for o in _options(child) if o.flags != ["-h", "--help"]],
                positionals=positionals,
                takes_account=any(d in _ACCOUNT_POSITIONALS for d, _ in positionals),
                first_choices=_first_choices(name, positionals),
            )
        )
    return _options(parser), commands


def _first_choices(command: str, positionals: list[tuple[str, str]]) -> list[str]:
    """`mailoauth recipe CLIENT`: the clients with recipes, from the pages it reads."""
    if command == "recipe" and positionals and positionals[0][0] == "client":
        from mailoauthd.helper import recipes

        return list(recipes.pages())
    return []


__all__ = ["GENERATOR", "Command", "Option", "subcommands"]
