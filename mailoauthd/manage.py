"""
The `mailoauth` subcommands people run by hand: status, refresh, import, revoke, authorize.

`token` and `sasl` never come here (client.py answers them without argparse
or json). Standard library only, like the rest of the helper.
"""

from __future__ import annotations

import argparse
import json
import sys

from mailoauthd import __version__, client, errors, protocol

# Manual operations may wait for a slow provider; a person is watching.
ADMIN_TIMEOUT = 60.0


def _parser() -> argparse.ArgumentParser:
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
            default=client.DEFAULT_TIMEOUT,
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
            const=client.DEFAULT_WAIT,
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
                choices=("authorization_code", "device_code"),
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
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse's usage errors exit 2, --help exits 0
        return int(exc.code or 0)
    command = args.command
    if command in ("token", "sasl"):
        # client.py answers these before argparse is ever imported; we get here
        # only with options it does not know, in an order it does not take.
        raise client._Fail(
            f"usage: mailoauth [--socket PATH] {command} ACCOUNT [--timeout S] [--min-validity S]",
            errors.EXIT_USAGE,
        )
    if command == "authorize" and (args.test is None) == (args.account is None):
        raise client._Fail(
            "usage: mailoauth authorize ACCOUNT | mailoauth authorize --test PROFILE",
            errors.EXIT_USAGE,
        )
    if command == "authorize" and args.test is not None:
        from mailoauthd import trial

        return trial.run(
            args.test,
            config_path=args.config,
            flow=args.flow,
            open_browser=not args.no_browser,
            browser_command=args.browser_command,
        )
    if command == "authorize":
        from mailoauthd import signin_client

        return signin_client.run(
            args.account,
            socket_path=args.socket,
            flow=args.flow,
            open_browser=not args.no_browser,
            browser_command=args.browser_command,
        )
    if command == "status":
        return _status(args)
    if command == "inspect":
        from mailoauthd import tokeninfo

        return tokeninfo.main(args.account, socket_path=args.socket)
    if command == "recipe":
        from mailoauthd import recipes

        return recipes.main(args.client, args.account, socket_path=args.socket)
    if command == "reload":
        line = protocol.encode({"v": protocol.VERSION, "op": "reload"})
        reply = client.request_reply(line, args.socket, ADMIN_TIMEOUT)
        count = reply.get("accounts")
        sys.stderr.write(f"mailoauth: configuration reloaded: {plural(count, 'account')}\n")
        return 0
    if command == "test":
        from mailoauthd import logincheck

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
        from mailoauthd import migrate

        tool, *sources = args.from_tool
        if tool not in migrate.SOURCES or len(sources) > 1:
            raise client._Fail(
                f"--from takes one of {', '.join(migrate.SOURCES)} and at most one file",
                errors.EXIT_USAGE,
            )

        asked = {"v": protocol.VERSION, "op": "servers", "account": args.account}
        servers = client.request_reply(protocol.encode(asked), args.socket, ADMIN_TIMEOUT)
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
            raise client._Fail(
                "no refresh token on stdin (paste it, or pipe it in: "
                f"'mailoauth import {args.account} < file')",
                errors.EXIT_USAGE,
            )
        request["refresh_token"] = token
    reply = client.request_reply(protocol.encode(request), args.socket, timeout + 5)
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


def _status(args: argparse.Namespace) -> int:
    request = protocol.encode({"v": protocol.VERSION, "op": "status"})
    reply = client.request_reply(request, args.socket, 10.0)
    rows = reply.get("accounts")
    if not isinstance(rows, list):
        raise client._Fail("mailoauthd sent a status without accounts", errors.EXIT_ERROR)
    if args.account:
        rows = [row for row in rows if row.get("account") == args.account]
        if not rows:
            raise client._Fail(f"{args.account}: no such account", errors.EXIT_ERROR)
    if args.names:
        sys.stdout.write("".join(f"{row.get('account')}\n" for row in rows))
        return 0
    if args.check:
        return _check(rows, as_json=args.json)
    if args.json:
        shown = {"version": reply.get("version"), "accounts": rows}
        if isinstance(reply.get("listeners"), dict):
            shown["listeners"] = reply["listeners"]  # the proxy's (docs/proxy.md)
        json.dump(shown, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    header = ("ACCOUNT", "STATE", "EXPIRES IN", "LAST REFRESH", "NEXT CHECK", "LAST ERROR")
    table = [header]
    for row in rows:
        table.append(
            (
                str(row.get("account")),
                str(row.get("status")),
                _duration(row.get("expires_in")),
                _short_time(row.get("last_refresh")),
                _short_time(row.get("next_check")),
                str(row.get("last_error") or "-"),
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
    for r in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=False)) + "  " + r[-1])
    for row in rows:
        if row.get("hint") and row.get("status") != "ok":
            print(f"{row.get('account')}: {row.get('hint')}")
        if row.get("scope_warning"):
            print(f"{row.get('account')}: warning: {row.get('scope_warning')}")
        if row.get("refresh_token_expiring"):
            name = row.get("account")
            issued = _short_time(row.get("refresh_token_issued_at"))
            used = _short_time(row.get("refresh_token_last_used"))
            print(
                f"{name}: the refresh token (issued {issued}, last used {used}) stops working "
                f"around {_short_time(row.get('refresh_token_expires_at'))}; "
                f"run 'mailoauth authorize {name}' before then"
            )
    _proxy_status(reply, rows)
    return 0


def _proxy_status(reply: dict[str, object], rows: list[dict[str, object]]) -> None:
    """The proxy's listeners, and each account's proxied sessions (when it runs)."""
    listeners = reply.get("listeners")
    if not isinstance(listeners, dict):
        return
    print("proxy: " + (", ".join(f"{k} {v}" for k, v in listeners.items()) or "no listeners"))
    for row in rows:
        if row.get("proxy_sessions_total"):
            print(
                f"{row.get('account')}: proxied sessions {row.get('proxy_sessions_open')} open, "
                f"{row.get('proxy_sessions_total')} since start"
            )


# `status --check`: the exit status for an unhealthy account's state; the most
# urgent wins: a broken configuration or state file, then a person to sign in.
_CHECK_EXITS = {"needs_authorization": errors.EXIT_NEEDS_AUTH, "failing": errors.EXIT_TEMPORARY}
_CHECK_ORDER = (errors.EXIT_ERROR, errors.EXIT_NEEDS_AUTH, errors.EXIT_TEMPORARY)


def _check(rows: list[dict[str, object]], *, as_json: bool) -> int:
    """Report the accounts that need attention; the exit status says which kind."""
    # A daemon that predates `healthy` is judged by the state alone.
    sick = [row for row in rows if not row.get("healthy", row.get("status") == "ok")]
    status = errors.EXIT_OK
    if sick:
        found = {_CHECK_EXITS.get(str(row.get("status")), errors.EXIT_ERROR) for row in sick}
        status = next(code for code in _CHECK_ORDER if code in found)
    if as_json:
        json.dump({"healthy": not sick, "accounts": rows}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return status
    if not sick:
        print(f"OK: {plural(len(rows), 'account')} healthy")
        return status
    names = ", ".join(f"{row.get('account')} {row.get('status')}" for row in sick)
    print(f"UNHEALTHY: {len(sick)} of {plural(len(rows), 'account')}: {names}")
    for row in sick:
        since = f" since {_short_time(row['error_since'])}" if row.get("error_since") else ""
        why = f": {row['last_error']}" if row.get("last_error") else ""
        hint = row.get("hint")
        if not hint and row.get("status") == "needs_authorization":
            hint = f"run 'mailoauth authorize {row.get('account')}'"
        hint = f"; {hint}" if hint else ""
        print(f"{row.get('account')}: {row.get('status')}{since}{why}{hint}")
    return status


def plural(count: object, noun: str) -> str:
    """ "1 account", "3 accounts"."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _duration(seconds: object) -> str:
    if not isinstance(seconds, int):
        return "-"
    if seconds <= 0:
        return "expired"
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _short_time(value: object) -> str:
    if not isinstance(value, str):
        return "-"
    return value.replace("+00:00", "Z")
