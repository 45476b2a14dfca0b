"""
`mailoauth status`: the daemon's status reply as a table, as JSON, or judged for monitoring.
"""

from __future__ import annotations

import json
import sys

from mailoauthd import errors, protocol
from mailoauthd.errors import helper_command
from mailoauthd.helper import transport


def main(
    account: str | None, *, socket_path: str | None, names: bool, check: bool, as_json: bool
) -> int:
    """
    Run `mailoauth status`; returns the exit status.

    Args:
        account: show only this account, or None for all.
        socket_path: the daemon's socket (--socket), or None for the defaults.
        names: only the account names, one a line (--names).
        check: judge health for monitoring (--check).
        as_json: machine-readable output (--json).
    """
    request = protocol.encode({"v": protocol.VERSION, "op": "status"})
    reply = transport.request_reply(request, socket_path, 10.0)
    rows = reply.get("accounts")
    if not isinstance(rows, list):
        raise errors.MailoauthdError("mailoauthd sent a status without accounts")
    if account:
        rows = [row for row in rows if row.get("account") == account]
        if not rows:
            raise errors.MailoauthdError(f"{account}: no such account")
    if names:
        sys.stdout.write("".join(f"{row.get('account')}\n" for row in rows))
        return 0
    store = reply.get("store")
    fleet = store if isinstance(store, dict) else None  # a fleet's etcd (docs/fleet.md)
    if check:
        return _check(rows, as_json=as_json, fleet=fleet)
    if as_json:
        shown = {"version": reply.get("version"), "accounts": rows}
        if isinstance(reply.get("listeners"), dict):
            shown["listeners"] = reply["listeners"]  # the proxy's (docs/proxy.md)
        if fleet is not None:
            shown["store"] = fleet
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
                f"run {helper_command('authorize', name)} before then"
            )
    _proxy_status(reply, rows)
    if fleet is not None:
        print(fleet_line(fleet))
    return 0


def fleet_line(fleet: dict[str, object]) -> str:
    """One line on the fleet: etcd reachable or not, who leads, whether this daemon refreshes."""
    if not fleet.get("healthy"):
        return f"store: etcd UNHEALTHY: {fleet.get('problem')}"
    if fleet.get("refreshing"):
        return f"store: etcd; this daemon ({fleet.get('this_daemon')}) leads and refreshes"
    return f"store: etcd; {fleet.get('leader')} leads and refreshes, this daemon serves"


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
_CHECK_EXITS = {
    protocol.Status.NEEDS_AUTHORIZATION: errors.EXIT_NEEDS_AUTH,
    protocol.Status.FAILING: errors.EXIT_TEMPORARY,
}
_CHECK_ORDER = (errors.EXIT_ERROR, errors.EXIT_NEEDS_AUTH, errors.EXIT_TEMPORARY)


def _check(
    rows: list[dict[str, object]], *, as_json: bool, fleet: dict[str, object] | None = None
) -> int:
    """Report the accounts that need attention; the exit status says which kind."""
    # A daemon that predates `healthy` is judged by the state alone.
    sick = [row for row in rows if not row.get("healthy", row.get("status") == protocol.Status.OK)]
    status = errors.EXIT_OK
    if sick:
        found = {_CHECK_EXITS.get(str(row.get("status")), errors.EXIT_ERROR) for row in sick}
        status = next(code for code in _CHECK_ORDER if code in found)
    # A fleet whose etcd is out of reach refreshes nothing: temporary, as a failing account.
    fleet_sick = fleet is not None and not fleet.get("healthy")
    if fleet_sick and status == errors.EXIT_OK:
        status = errors.EXIT_TEMPORARY
    if as_json:
        shown: dict[str, object] = {"healthy": not sick and not fleet_sick, "accounts": rows}
        if fleet is not None:
            shown["store"] = fleet
        json.dump(shown, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return status
    if fleet_sick and fleet is not None:
        print(fleet_line(fleet))
    if not sick:
        if fleet_sick:
            print(f"UNHEALTHY: the fleet's store; {plural(len(rows), 'account')} served meanwhile")
        else:
            print(f"OK: {plural(len(rows), 'account')} healthy")
        return status
    names = ", ".join(f"{row.get('account')} {row.get('status')}" for row in sick)
    print(f"UNHEALTHY: {len(sick)} of {plural(len(rows), 'account')}: {names}")
    for row in sick:
        since = f" since {_short_time(row['error_since'])}" if row.get("error_since") else ""
        why = f": {row['last_error']}" if row.get("last_error") else ""
        hint = row.get("hint")
        if not hint and row.get("status") == protocol.Status.NEEDS_AUTHORIZATION:
            hint = "run " + helper_command("authorize", row.get("account"))
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
