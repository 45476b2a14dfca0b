"""
The `mailoauth` commands people run by hand: the argparse parser, and one dispatch.

`token` and `sasl` never come here (token.py answers them without argparse or
json). Each command's work lives in its own module beside this one (status,
signin_terminal, logincheck, tokeninfo, recipes, migrate), imported only when run.
Standard library only, like the rest of the helper: `authorize --test` needs
the daemon's libraries, so it runs as a child process (`python -m mailoauthd.authorization.trial`).
"""

from __future__ import annotations

import argparse
import sys

from mailoauthd import __version__, errors, protocol
from mailoauthd.flows import SIGN_IN_FLOWS
from mailoauthd.helper import transport

# Manual operations may wait for a slow provider; a person is watching.
ADMIN_TIMEOUT = 60.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailoauth",
        description="Ask mailoauthd for OAuth2 access tokens, and manage its accounts.",
        epilog="exit status: 0 ok, 1 error, 2 usage, 3 daemon unreachable, "
        "4 needs authorization, 5 provider temporarily failing",
    )
    parser.add_argument("--version", action="version", version=f"mailoauth {__version__}")
    parser.add_argument("--socket", metavar="PATH", help="the daemon's socket")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, text in (
        ("token", "print the current access token"),
        ("sasl", "print a base64 SASL initial response (XOAUTH2 or OAUTHBEARER)"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("account")
        cmd.add_argument(
            "--timeout",
            type=float,
            default=transport.DEFAULT_TIMEOUT,
            metavar="SECONDS",
            help="wait at most this long for a due refresh (default %(default)g)",
        )
        cmd.add_argument(
            "--min-validity",
            type=float,
            metavar="SECONDS",
            help="only hand out a token valid at least this long",
        )
        cmd.add_argument(
            "--wait",
            nargs="?",
            type=float,
            const=transport.DEFAULT_WAIT,
            metavar="SECONDS",
            help="if the account needs signing in, wait for that (default %(const)g)",
        )
        if name == "sasl":
            cmd.add_argument(
                "--mechanism",
                choices=("xoauth2", "oauthbearer"),
                help="the SASL mechanism (default xoauth2)",
            )
            cmd.add_argument("--host", help="(OAUTHBEARER) the server's name")
            cmd.add_argument("--port", help="(OAUTHBEARER) the server's port")
    status = sub.add_parser("status", help="show every account's state")
    status.add_argument("account", nargs="?")
    status.add_argument("--json", action="store_true", help="stable, machine-readable output")
    status.add_argument(
        "--names",
        action="store_true",
        help="print only the account names, one a line (for shell completion)",
    )
    status.add_argument(
        "--check",
        action="store_true",
        help="for monitoring: exit 0 when every account is healthy, else 1 (misconfigured or "
        "unreadable state), 4 (needs authorization) or 5 (failing for longer than "
        "unhealthy_after), with one line per problem",
    )
    sub.add_parser("reload", help="re-read the daemon's configuration (as SIGHUP does)")
    recipe = sub.add_parser(
        "recipe",
        help="print a mail program's configuration for an account, from the tested recipes",
    )
    recipe.add_argument("client", help="msmtp, mbsync, neomutt, offlineimap, getmail, curl, ...")
    recipe.add_argument("account")
    for name, text in (
        ("refresh", "refresh an account's token now and print the new expiry"),
        ("import", "read a refresh token on stdin and store it (migration from other tools)"),
        ("revoke", "revoke at the provider where supported, then forget the tokens"),
        ("authorize", "sign in: in a browser, by pasting its address back, or by code"),
        ("test", "log in to the account's IMAP and SMTP servers with its token"),
        ("inspect", "show what the current access token says (audience, scopes, user, expiry)"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("account", nargs="?" if name == "authorize" else None)
        if name == "import":
            cmd.add_argument(
                "--from",
                dest="from_tool",
                nargs="+",
                metavar=("TOOL", "SOURCE"),
                help="take the refresh token from another tool instead of stdin: mutt_oauth2 "
                "FILE, oama [EMAIL|FILE], email-oauth2-proxy CONFIG or getmail FILE",
            )
            cmd.add_argument(
                "--decrypt-command",
                metavar="COMMAND",
                help="decrypt mutt_oauth2's or oama's file with this instead of 'gpg --decrypt'",
            )
        if name in ("refresh", "import"):
            cmd.add_argument(
                "--timeout",
                type=float,
                default=ADMIN_TIMEOUT,
                metavar="SECONDS",
                help="wait at most this long for the provider's answer (default %(default)g)",
            )
        if name == "authorize":
            cmd.add_argument(
                "--no-browser",
                action="store_true",
                help="only print the address to open (for a browser on another machine)",
            )
            cmd.add_argument(
                "--browser-command",
                metavar="CMD",
                help="open the address with this command (%%s is the address, else it is "
                "appended) instead of $BROWSER or the default browser",
            )
            cmd.add_argument(
                "--flow",
                choices=SIGN_IN_FLOWS,
                help="sign in this way instead of the account's configured flow",
            )
            cmd.add_argument(
                "--test",
                metavar="PROFILE",
                help="a trial sign-in with this OAuth profile, for no account: report what "
                "the provider returns and what is wrong with it, then revoke and forget it "
                "(reads the configuration and the client secret itself; stores nothing)",
            )
            cmd.add_argument(
                "--config", metavar="PATH", help="with --test: the configuration file to read"
            )
        if name == "test":
            cmd.add_argument(
                "--mechanism",
                choices=("xoauth2", "oauthbearer"),
                default="xoauth2",
                help="the SASL mechanism (default xoauth2)",
            )
            cmd.add_argument("--only", choices=("imap", "smtp"), help="check one protocol")
            cmd.add_argument(
                "--timeout",
                type=float,
                default=30.0,
                metavar="SECONDS",
                help="seconds for each step (default 30)",
            )
    return parser


def main(argv: list[str]) -> int:
    """Run a management subcommand; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse's usage errors exit 2, --help exits 0
        return int(exc.code or 0)
    command = args.command
    if command in ("token", "sasl"):
        # token.py answers these before argparse is ever imported; we get here
        # only with options it does not know, in an order it does not take.
        raise errors.UsageError(
            f"usage: mailoauth [--socket PATH] {command} ACCOUNT [--timeout S] [--min-validity S]"
        )
    if command == "authorize" and (args.test is None) == (args.account is None):
        raise errors.UsageError(
            "usage: mailoauth authorize ACCOUNT | mailoauth authorize --test PROFILE"
        )
    if command == "authorize" and args.test is not None:
        return _trial(args)
    if command == "authorize":
        from mailoauthd.helper import signin_terminal

        return signin_terminal.run(
            args.account,
            socket_path=args.socket,
            flow=args.flow,
            open_browser=not args.no_browser,
            browser_command=args.browser_command,
        )
    if command == "status":
        from mailoauthd.helper import status

        return status.main(
            args.account,
            socket_path=args.socket,
            names=args.names,
            check=args.check,
            as_json=args.json,
        )
    if command == "inspect":
        from mailoauthd.helper import tokeninfo

        return tokeninfo.main(args.account, socket_path=args.socket)
    if command == "recipe":
        from mailoauthd.helper import recipes

        return recipes.main(args.client, args.account, socket_path=args.socket)
    if command == "reload":
        line = protocol.encode({"v": protocol.VERSION, "op": "reload"})
        from mailoauthd.helper.status import plural

        reply = transport.request_reply(line, args.socket, ADMIN_TIMEOUT)
        count = reply.get("accounts")
        sys.stderr.write(f"mailoauth: configuration reloaded: {plural(count, 'account')}\n")
        return 0
    if command == "test":
        from mailoauthd.helper import logincheck

        return logincheck.main(
            args.account,
            socket_path=args.socket,
            mechanism=args.mechanism,
            only=args.only,
            timeout=args.timeout,
        )
    request: dict[str, object] = {"v": protocol.VERSION, "op": command, "account": args.account}
    timeout = getattr(args, "timeout", ADMIN_TIMEOUT)
    request["timeout"] = timeout
    if command == "import" and args.from_tool:
        from mailoauthd.helper import migrate

        tool, *sources = args.from_tool
        if tool not in migrate.SOURCES or len(sources) > 1:
            raise errors.UsageError(
                f"--from takes one of {', '.join(migrate.SOURCES)} and at most one file"
            )

        asked = {"v": protocol.VERSION, "op": "servers", "account": args.account}
        servers = transport.request_reply(protocol.encode(asked), args.socket, ADMIN_TIMEOUT)
        found = migrate.read(
            tool,
            sources[0] if sources else None,
            username=str(servers.get("username") or ""),
            decrypt=args.decrypt_command,
        )
        sys.stderr.write(f"mailoauth: {args.account}: {migrate.describe(found)}\n")
        for note in found.notes:
            sys.stderr.write(f"mailoauth: note: {note}\n")
        request["refresh_token"] = found.refresh_token
        if found.client_id:
            request["client_id"] = found.client_id
    elif command == "import":
        token = sys.stdin.readline().strip()
        if not token:
            raise errors.UsageError(
                "no refresh token on stdin (paste it, or pipe it in: "
                f"{errors.helper_command('import', args.account, '<', 'file')})"
            )
        request["refresh_token"] = token
    reply = transport.request_reply(protocol.encode(request), args.socket, timeout + 5)
    if command == "revoke":
        sys.stderr.write(f"mailoauth: {args.account}: {reply.get('note', 'done')}\n")
    elif command == "refresh":
        print(reply.get("expires_at"))
    elif command == "import":
        sys.stderr.write(
            f"mailoauth: {args.account}: stored; "
            f"access token valid until {reply.get('expires_at')}\n"
        )
    return 0


def _trial(args: argparse.Namespace) -> int:
    """
    `authorize --test PROFILE`, in a child interpreter: the trial sign-in reads the
    configuration and talks to the provider with the daemon's libraries (trio, httpx),
    which the helper never imports. The child shares our terminal and exits with the
    status we return.
    """
    import subprocess

    command = [sys.executable, "-P", "-m", "mailoauthd.authorization.trial", args.test]
    if args.config is not None:
        command += ["--config", args.config]
    if args.flow is not None:
        command += ["--flow", args.flow]
    if args.no_browser:
        command.append("--no-browser")
    if args.browser_command is not None:
        command += ["--browser-command", args.browser_command]
    return subprocess.run(command, check=False).returncode
