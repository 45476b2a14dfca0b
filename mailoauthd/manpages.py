"""
Man pages and shell completions, generated: `make man` (`python -m mailoauthd.manpages share`).

Everything comes from what the programs themselves use, so that the pages and the
completions say what `--help` says:

- mailoauth(1) and the completions of `mailoauth`: the helper's argument parser
  (helper/commands.py), which `mailoauth --help` prints;
- mailoauthd(8) and the completions of `mailoauthd`: the daemon's (cli.py);
- mailoauthd.toml(5): the keys the configuration checker accepts (config/schema.py's key
  tables), each with its meaning from README.md's key tables.

tests/test_manpages.py fails when the files in share/ differ from what this writes.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mailoauthd import __version__, cli, config
from mailoauthd.helper.commands import build_parser as helper_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SOURCE = "mailoauthd"

# Subcommands of `mailoauth` whose one positional argument is an account name.
_ACCOUNT_POSITIONALS = ("account",)


# --- what the parsers say ------------------------------------------------------------------


@dataclass
class Option:
    flags: list[str]
    metavar: str | None  # None: a flag without a value
    help: str
    choices: list[str] = field(default_factory=list)
    files: bool = False  # its value is a path
    optional: str = ""  # "[=SECONDS]": a value that may follow '='


@dataclass
class Command:
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


def _subcommands(parser: argparse.ArgumentParser) -> tuple[list[Option], list[Command]]:
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


# --- what the configuration accepts ----------------------------------------------------------


def _readme_meanings() -> dict[str, dict[str, str]]:
    """README.md's key tables: table name -> key -> meaning (the default folded in)."""
    text = README.read_text(encoding="utf-8")
    meanings: dict[str, dict[str, str]] = {}
    table = None
    for line in text.splitlines():
        heading = re.match(r"### `\[(\w+)", line)
        if heading:
            table = heading.group(1)
            meanings.setdefault(table, {})
            continue
        if line.startswith("## "):
            table = None
        if table is None or not line.startswith("| `"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        keys = re.findall(r"`(\w+)`", cells[0])
        meaning = cells[-1]
        if len(cells) == 3:  # key | default | meaning
            meaning = f"{meaning}; default: {cells[1]}"
        for key in keys:
            meanings[table][key] = meaning
    return meanings


def config_keys() -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(table, its heading, [(key, meaning)]) for every table the configuration checker knows."""
    meanings = _readme_meanings()
    tables = []
    for name, (heading, keys) in config.TABLES.items():
        known = meanings.get(name, {})
        rows = [(key, known.get(key, "")) for key in keys]
        tables.append((name, heading, rows))
    return tables


# --- roff ------------------------------------------------------------------------------------


def _roff(text: str) -> str:
    """Markdown-ish text (`code`) as roff: code bold, backslashes and dashes escaped."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    text = re.sub(r"`([^`]*)`", r"\\fB\1\\fR", text)
    text = re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", text)
    lines = [("\\&" + line) if line.startswith((".", "'")) else line for line in text.split("\n")]
    return "\n".join(lines)


def _header(name: str, section: int, title: str) -> list[str]:
    return [
        f".\\\" Generated by 'make man' ({SOURCE}/manpages.py): do not edit.",
        f'.TH {name.upper()} {section} "" "{SOURCE} {__version__}" "{title}"',
        ".SH NAME",
    ]


def _option_lines(options: list[Option]) -> list[str]:
    lines = []
    for option in options:
        flags = ", ".join(f"\\fB{_roff(flag)}\\fR" for flag in option.flags)
        if option.metavar:
            flags += f" \\fI{_roff(option.metavar)}\\fR"
        flags += _roff(option.optional)
        lines += [".TP", flags, _roff(option.help or "")]
    return lines


def helper_page() -> str:
    parser = helper_parser()
    options, commands = _subcommands(parser)
    lines = _header("mailoauth", 1, "User Commands")
    lines += [
        "mailoauth \\- " + _roff(parser.description or ""),
        ".SH SYNOPSIS",
        ".B mailoauth",
        "[\\fB\\-\\-socket\\fR \\fIPATH\\fR] \\fICOMMAND\\fR ...",
        ".SH DESCRIPTION",
        _roff(
            "Mail programs run `mailoauth token ACCOUNT` (or `sasl`) for every connection: "
            "it asks the running mailoauthd for the account's current access token and "
            "prints it, and nothing else, on stdout. The other commands are for people: "
            "the accounts' state, signing in, importing and revoking tokens."
        ),
        ".PP",
        _roff(
            "It tries `--socket`, else `$MAILOAUTHD_SOCKET`, else the per-user socket "
            "`$XDG_RUNTIME_DIR/mailoauthd/socket` and then the system one, "
            "`/run/mailoauthd/socket`."
        ),
        ".SH OPTIONS",
        *_option_lines(options),
        ".SH COMMANDS",
    ]
    for command in commands:
        lines += [".SS " + _roff(f"mailoauth {command.usage.removeprefix('mailoauth ')}")]
        lines += [_roff(command.help[:1].upper() + command.help[1:] + ".")]
        if command.options:
            lines += [".RS", *_option_lines(command.options), ".RE"]
    lines += [
        ".SH EXIT STATUS",
        ".TP\n0\nsuccess",
        ".TP\n1\nan error the daemon reported, including a refusal",
        ".TP\n2\nusage",
        ".TP\n3\nthe daemon cannot be reached",
        ".TP\n4\nthe account needs someone to sign in (\\fBmailoauth authorize\\fR)",
        ".TP\n5\nthe provider is failing just now; try again later",
        ".SH ENVIRONMENT",
        ".TP\n.B MAILOAUTHD_SOCKET\nthe daemon's socket, when no \\fB\\-\\-socket\\fR is given",
        ".TP\n.B XDG_RUNTIME_DIR\nwhere the per-user socket is",
        ".SH SEE ALSO",
        ".BR mailoauthd (8),",
        ".BR mailoauthd.toml (5)",
    ]
    return "\n".join(lines) + "\n"


def daemon_page() -> str:
    parser = cli._parser()
    options, commands = _subcommands(parser)
    lines = _header("mailoauthd", 8, "System Administration")
    lines += [
        "mailoauthd \\- " + _roff(parser.description or ""),
        ".SH SYNOPSIS",
        ".B mailoauthd",
        "[\\fB\\-\\-config\\fR \\fIPATH\\fR] [\\fB\\-\\-system\\fR] [\\fICOMMAND\\fR]",
        ".SH DESCRIPTION",
        _roff(
            "mailoauthd keeps the OAuth2 tokens of mail accounts fresh: it refreshes each "
            "access token before it expires and hands it to `mailoauth token ACCOUNT` over "
            "a Unix socket. It runs per user (the default) or for the whole host "
            "(`--system`, the default as root), normally under systemd."
        ),
        ".SH OPTIONS",
        *_option_lines(options),
        ".SH COMMANDS",
    ]
    for command in commands:
        lines += [".SS " + _roff(f"mailoauthd {command.usage.removeprefix('mailoauthd ')}")]
        lines += [_roff(command.help[:1].upper() + command.help[1:] + ".")]
        if command.options:
            lines += [".RS", *_option_lines(command.options), ".RE"]
    lines += [
        ".SH FILES",
        ".TP\n.I ~/.config/mailoauthd/config.toml\nper-user configuration",
        ".TP\n.I /etc/mailoauthd/config.toml\nsystem configuration",
        ".TP\n.I ~/.local/state/mailoauthd/\nper-user token store",
        ".TP\n.I /var/lib/mailoauthd/\nsystem token store",
        ".TP\n.I $XDG_RUNTIME_DIR/mailoauthd/socket\nper-user socket",
        ".TP\n.I /run/mailoauthd/socket\nsystem socket",
        ".SH ENVIRONMENT",
        ".TP\n.B MAILOAUTHD_CONFIG\nthe per-user configuration file",
        ".TP\n.B MAILOAUTHD_SOCKET\nthe socket to listen on",
        ".TP\n.B CREDENTIALS_DIRECTORY\n"
        + _roff(
            "set by systemd for the service's `LoadCredential=`; `${CREDENTIALS_DIRECTORY}` "
            "in `client_secret_file` paths reads it (`check-config --credentials-directory "
            "DIR` stands in for it)"
        ),
        ".SH EXIT STATUS",
        _roff("0 on success; 1 when the configuration or the start-up fails; 2 usage."),
        ".SH SEE ALSO",
        ".BR mailoauth (1),",
        ".BR mailoauthd.toml (5),",
        ".BR systemd.exec (5)",
    ]
    return "\n".join(lines) + "\n"


def config_page() -> str:
    lines = _header("mailoauthd.toml", 5, "File Formats")
    lines += [
        "mailoauthd.toml \\- the configuration of mailoauthd",
        ".SH DESCRIPTION",
        _roff(
            "A TOML file: `[daemon]` settings, one `[providers.NAME]` table per app "
            "registration (an OAuth profile), one `[accounts.NAME]` table per mail account. "
            "Unknown keys, wrong types and missing keys are errors that name the file, the "
            "table and the key; `mailoauthd check-config` checks a file without starting "
            "anything, and `mailoauthd example-config` prints an annotated example."
        ),
        ".PP",
        _roff(
            'Durations are strings such as "90s", "3m", "1h30m", "2d", or a number of '
            "seconds. Names of providers and accounts are 1 to 64 letters, digits, '_', "
            "'.' or '-'."
        ),
    ]
    for _name, heading, rows in config_keys():
        lines += [".SH " + _roff(heading.upper())]
        for key, meaning in rows:
            lines += [".TP", f"\\fB{_roff(key)}\\fR", _roff(meaning) if meaning else ""]
    lines += [
        ".SH EXAMPLE",
        ".EX",
        *(
            _roff(line)
            for line in (
                "[providers.office365]",
                'preset = "microsoft"',
                'client_id = "00000000-0000-0000-0000-000000000000"',
                'client_secret_file = "${CREDENTIALS_DIRECTORY}/office365.secret"',
                "",
                "[accounts.work]",
                'provider = "office365"',
                'username = "alice@contoso.com"',
            )
        ),
        ".EE",
        ".SH SEE ALSO",
        ".BR mailoauthd (8),",
        ".BR mailoauth (1)",
    ]
    return "\n".join(lines) + "\n"


# --- completions -----------------------------------------------------------------------------

_ACCOUNTS = 'mailoauth ${socket:+--socket "$socket"} status --names 2>/dev/null'


def _sh(words: list[str]) -> str:
    return " ".join(words)


def bash_completion(program: str, parser: argparse.ArgumentParser) -> str:
    options, commands = _subcommands(parser)
    valued = [f for o in options for f in o.flags if o.metavar]
    lines = [
        f"# bash completion for {program}. Generated by 'make man' ({SOURCE}/manpages.py).",
        f"_{program}() {{",
        "    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]}",
        '    local cmd="" socket="" i start=0',
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        "        case ${COMP_WORDS[i]} in",
        "            --socket) socket=${COMP_WORDS[i+1]}; ((i++)) ;;",
    ]
    if others := [f for f in valued if f != "--socket"]:
        lines.append(f"            {'|'.join(others)}) ((i++)) ;;")
    lines += [
        "            -*) ;;",
        "            *) cmd=${COMP_WORDS[i]}; start=$i; break ;;",
        "        esac",
        "    done",
        '    case "$cmd:$prev" in',
    ]
    everything = [(None, o) for o in options] + [(c, o) for c in commands for o in c.options]
    for command, option in everything:
        if not option.metavar:
            continue
        if command is not None:
            pattern = "|".join(f"{command.name}:{f}" for f in option.flags)
        else:
            pattern = "|".join(f"*:{f}" for f in option.flags)
        if option.choices:
            reply = f'COMPREPLY=($(compgen -W "{_sh(option.choices)}" -- "$cur"))'
        elif option.files:
            reply = 'COMPREPLY=($(compgen -f -- "$cur"))'
        else:
            reply = "COMPREPLY=()"
        lines.append(f"        {pattern}) {reply}; return ;;")
    lines += [
        "    esac",
        "    if [[ -z $cmd ]]; then",
        "        COMPREPLY=($(compgen -W "
        f'"{_sh([f for o in options for f in o.flags] + [c.name for c in commands])}" '
        '-- "$cur"))',
        "        return",
        "    fi",
        "    if [[ $cur == -* ]]; then",
        "        case $cmd in",
    ]
    for command in commands:
        flags = [f for o in command.options for f in o.flags] + ["--help"]
        lines.append(
            f'            {command.name}) COMPREPLY=($(compgen -W "{_sh(flags)}" -- "$cur")) ;;'
        )
    lines += ["        esac", "        return", "    fi"]
    for command in commands:
        if command.first_choices:
            lines += [
                f"    if [[ $cmd == {command.name} ]] && ((COMP_CWORD == start + 1)); then",
                f'        COMPREPLY=($(compgen -W "{_sh(command.first_choices)}" -- "$cur"))',
                "        return",
                "    fi",
            ]
    with_accounts = [c.name for c in commands if c.takes_account]
    if with_accounts:
        lines += [
            "    case $cmd in",
            f"        {'|'.join(with_accounts)})",
            f'            COMPREPLY=($(compgen -W "$({_ACCOUNTS})" -- "$cur")) ;;',
            "    esac",
        ]
    lines += ["}", f"complete -F _{program} {program}"]
    return "\n".join(lines) + "\n"


def _zsh_text(text: str) -> str:
    return re.sub(r"[\[\]:'`\\]", "", text).replace("$", "")


def _zsh_spec(option: Option) -> Iterator[str]:
    text = _zsh_text(option.help.split(";")[0].split(" (")[0])
    value = ""
    if option.metavar:
        action = ":_files" if option.files else ""
        if option.choices:
            action = f":({' '.join(option.choices)})"
        value = f":{_zsh_text(option.metavar.lower())}{action or ':'}"
        if not action:
            value = f":{_zsh_text(option.metavar.lower())}: "
    for flag in option.flags:
        yield f"'{flag}[{text}]{value}'"


def zsh_completion(program: str, parser: argparse.ArgumentParser) -> str:
    options, commands = _subcommands(parser)
    lines = [
        f"#compdef {program}",
        f"# zsh completion for {program}. Generated by 'make man' ({SOURCE}/manpages.py).",
        "",
        f"_{program}_accounts() {{",
        "    local socket=${opt_args[--socket]}",
        f'    local -a names; names=(${{(f)"$({_ACCOUNTS})"}})',
        "    compadd -a names",
        "}",
        "",
        f"_{program}() {{",
        "    local curcontext=$curcontext state line ret=1",
        "    typeset -A opt_args",
        "    _arguments -C \\",
    ]
    for option in options:
        for spec in _zsh_spec(option):
            lines.append(f"        {spec} \\")
    lines += [
        "        '1:command:->command' \\",
        "        '*::argument:->argument' && ret=0",
        "    case $state in",
        "        command)",
        "            local -a commands; commands=(",
    ]
    for command in commands:
        lines.append(f"                '{command.name}:{_zsh_text(command.help)}'")
    lines += [
        "            )",
        "            _describe command commands && ret=0 ;;",
        "        argument)",
        "            case $words[1] in",
    ]
    for command in commands:
        specs = [s for o in command.options for s in _zsh_spec(o)]
        if command.first_choices:
            specs.append(f"'1:{command.positionals[0][0]}:({' '.join(command.first_choices)})'")
        if command.takes_account:
            position = 1 + [d for d, _ in command.positionals].index("account")
            specs.append(f"'{position}:account:_{program}_accounts'")
        lines.append(f"                {command.name}) _arguments {' '.join(specs)} && ret=0 ;;")
    lines += ["            esac ;;", "    esac", "    return ret", "}", "", f'_{program} "$@"']
    return "\n".join(lines) + "\n"


def _fish_text(text: str) -> str:
    return text.replace("\\", "").replace("'", "\\'")


def fish_completion(program: str, parser: argparse.ArgumentParser) -> str:
    options, commands = _subcommands(parser)
    names = " ".join(c.name for c in commands)
    lines = [
        f"# fish completion for {program}. Generated by 'make man' ({SOURCE}/manpages.py).",
        f"complete -c {program} -f",
    ]

    def option_line(condition: str, option: Option) -> str:
        parts = [f"complete -c {program}"]
        if condition:
            parts.append(f"-n '{condition}'")
        for flag in option.flags:
            parts.append(f"-l {flag[2:]}" if flag.startswith("--") else f"-s {flag[1:]}")
        if option.choices:
            parts.append(f"-xa '{' '.join(option.choices)}'")
        elif option.files:
            parts.append("-rF")
        elif option.metavar:
            parts.append("-x")
        parts.append(f"-d '{_fish_text(option.help.split(';')[0])}'")
        return " ".join(parts)

    for option in options:
        lines.append(option_line("", option))
    for command in commands:
        lines.append(
            f"complete -c {program} -n 'not __fish_seen_subcommand_from {names}' "
            f"-a {command.name} -d '{_fish_text(command.help)}'"
        )
        for option in command.options:
            lines.append(option_line(f"__fish_seen_subcommand_from {command.name}", option))
    accounts = f"-a '({program} status --names 2>/dev/null)' -d account"
    plain = " ".join(c.name for c in commands if c.takes_account and not c.first_choices)
    if plain:
        lines.append(f"complete -c {program} -n '__fish_seen_subcommand_from {plain}' {accounts}")
    for command in commands:
        if command.first_choices:
            seen = f"__fish_seen_subcommand_from {' '.join(command.first_choices)}"
            lines.append(
                f"complete -c {program} -n '__fish_seen_subcommand_from {command.name}; "
                f"and not {seen}' -a '{' '.join(command.first_choices)}'"
            )
            if command.takes_account:
                lines.append(
                    f"complete -c {program} -n '__fish_seen_subcommand_from {command.name}; "
                    f"and {seen}' {accounts}"
                )
    return "\n".join(lines) + "\n"


# --- the files -------------------------------------------------------------------------------


def generated() -> dict[str, str]:
    """Path below share/ -> content, for every generated file."""
    helper, daemon = helper_parser(), cli._parser()
    return {
        "man/man1/mailoauth.1": helper_page(),
        "man/man8/mailoauthd.8": daemon_page(),
        "man/man5/mailoauthd.toml.5": config_page(),
        "bash-completion/completions/mailoauth": bash_completion("mailoauth", helper),
        "bash-completion/completions/mailoauthd": bash_completion("mailoauthd", daemon),
        "zsh/site-functions/_mailoauth": zsh_completion("mailoauth", helper),
        "zsh/site-functions/_mailoauthd": zsh_completion("mailoauthd", daemon),
        "fish/vendor_completions.d/mailoauth.fish": fish_completion("mailoauth", helper),
        "fish/vendor_completions.d/mailoauthd.fish": fish_completion("mailoauthd", daemon),
    }


def main(argv: list[str]) -> int:
    """Write every generated file under the directory given (share/)."""
    if len(argv) != 1:
        sys.stderr.write("usage: python -m mailoauthd.manpages SHARE_DIR\n")
        return 2
    base = Path(argv[0])
    for name, text in generated().items():
        path = base / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    undocumented = [
        f"[{table}] {key}" for table, _, rows in config_keys() for key, text in rows if not text
    ]
    if undocumented:
        sys.stderr.write(
            f"manpages: no meaning in {README.name}'s key tables for: {', '.join(undocumented)}\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
