"""
The `mailoauth` helper: one request to the daemon; the answer on stdout, or one line on stderr.

Mail programs spawn `mailoauth token ACCOUNT` once per connection, so the
`token` and `sasl` paths import nothing beyond what the interpreter has already
loaded plus two C modules (`_socket`, `_json`) and `binascii`; no argparse, no
json, no pathlib. A test holds us to that. The other subcommands are run by
people and may import what they like.

Exit status: 0 success, 1 error reported by the daemon, 2 usage,
3 daemon unreachable, 4 needs authorization, 5 provider temporarily failing.
"""

from __future__ import annotations

import _socket  # the C module: `socket` costs the helper a visible share of its start-up
import os
import sys

from mailoauthd import errors, paths, protocol

DEFAULT_TIMEOUT = 15.0
# `--wait` alone: five minutes to notice, run `mailoauth authorize` and sign in.
DEFAULT_WAIT = 300.0
# Time we allow the daemon beyond the request's own timeout to answer, so that
# its "provider timed out" reply reaches us instead of our own socket timeout.
ANSWER_GRACE = 5.0

USAGE = """\
usage: mailoauth [--socket PATH] COMMAND ...

commands:
  token ACCOUNT                 print the current access token
  sasl ACCOUNT                  print a base64 SASL initial response (XOAUTH2 or OAUTHBEARER)
  status [--json] [ACCOUNT]     show every account's state
  status --check [ACCOUNT]      for monitoring: exit 0 if healthy, else 1, 4 or 5
  reload                        re-read the daemon's configuration
  refresh ACCOUNT               refresh now, print the new expiry
  import ACCOUNT                read a refresh token on stdin and store it
  import ACCOUNT --from TOOL [SOURCE]
                                take it from mutt_oauth2, oama, email-oauth2-proxy or getmail
  revoke ACCOUNT                forget the account's tokens
  authorize ACCOUNT [--no-browser | --browser-command CMD] [--flow authorization_code|device_code]
                                sign in: in a browser, by pasting its address back, or by code
  authorize --test PROFILE [--config PATH]
                                a trial sign-in with a profile, for no account: report, revoke
  test ACCOUNT                  log in to the account's IMAP and SMTP servers with its token
  inspect ACCOUNT               what the access token says: audience, scopes, user, expiry
  recipe CLIENT ACCOUNT         a mail program's tested configuration, filled in for ACCOUNT

options for token and sasl:
  --timeout SECONDS             wait at most this long for a due refresh (default 15)
  --min-validity SECONDS        only hand out a token valid at least this long
  --wait[=SECONDS]              if the account needs signing in, wait for that (default 300)
  --mechanism xoauth2|oauthbearer   (sasl; default xoauth2)
  --host HOST --port PORT       (sasl, OAUTHBEARER) the server's name and port
"""


class _Help(Exception):
    """`token --help`: the usage on stdout, exit 0."""


class _Fail(Exception):
    """Ends the helper with one line on stderr and an exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def main(argv: list[str]) -> int:
    """Run the helper; returns the exit status."""
    try:
        socket_path, rest = _leading_socket(argv)
        if rest and rest[0] in ("token", "sasl"):
            try:
                return _hot(rest[0], rest[1:], socket_path)
            except _Help:
                sys.stdout.write(USAGE)
                return 0
        from mailoauthd import manage

        return manage.main(argv)
    except _Fail as exc:
        sys.stderr.write(f"mailoauth: {exc}\n")
        return exc.status
    except KeyboardInterrupt:
        return 130


def _leading_socket(argv: list[str]) -> tuple[str | None, list[str]]:
    """Split off a `--socket PATH` / `--socket=PATH` given before the command."""
    if argv and argv[0].startswith("--socket="):
        return argv[0].partition("=")[2], argv[1:]
    if len(argv) >= 2 and argv[0] == "--socket":
        return argv[1], argv[2:]
    return None, argv


def _usage(message: str) -> _Fail:
    return _Fail(f"{message}\n{USAGE}", errors.EXIT_USAGE)


def _seconds(option: str, value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise _usage(f"{option} takes a number of seconds (got {value!r})") from None
    if not 0 <= seconds <= 86400:
        raise _usage(f"{option} must be between 0 and 86400 seconds (got {value!r})")
    return seconds


_HOT_OPTIONS = ("--timeout", "--min-validity", "--socket", "--mechanism", "--host", "--port")


def _parse_hot(args: list[str]) -> tuple[str, dict[str, str]]:
    """Parse `ACCOUNT [--option VALUE | --option=VALUE]...` without argparse."""
    options: dict[str, str] = {}
    positional: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-h", "--help"):
            raise _Help()
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            if name == "--wait":  # its value is optional, so only in the --wait=S form
                options[name] = value if eq else str(DEFAULT_WAIT)
                i += 1
                continue
            if name not in _HOT_OPTIONS:
                raise _usage(f"unknown option {name}")
            if not eq:
                i += 1
                if i == len(args):
                    raise _usage(f"{name} needs a value")
                value = args[i]
            options[name] = value
        else:
            positional.append(arg)
        i += 1
    if len(positional) != 1:
        raise _usage("name exactly one account")
    return positional[0], options


def _hot(command: str, args: list[str], socket_path: str | None) -> int:
    account, options = _parse_hot(args)
    socket_path = options.get("--socket", socket_path)
    timeout = _seconds("--timeout", options.get("--timeout", str(DEFAULT_TIMEOUT)))
    # -1 asks the daemon for the account's own min_validity.
    min_validity = -1.0
    if "--min-validity" in options:
        min_validity = _seconds("--min-validity", options["--min-validity"])
    mechanism = options.get("--mechanism", "xoauth2").lower()
    if mechanism not in ("xoauth2", "oauthbearer"):
        raise _usage(f"--mechanism must be xoauth2 or oauthbearer (got {mechanism!r})")
    wait = _seconds("--wait", options["--wait"]) if "--wait" in options else 0.0
    request = protocol.encode_token_request(
        account, min_validity=min_validity, timeout=timeout, wait=wait
    )
    reply = request_reply(request, socket_path, timeout + wait + ANSWER_GRACE)
    token = reply.get("token")
    if not isinstance(token, str) or not token:
        raise _Fail(f"{account}: the daemon sent no token", errors.EXIT_ERROR)
    if command == "token":
        out = token
    else:
        user = reply.get("username")
        out = sasl_response(
            user if isinstance(user, str) else "",
            token,
            mechanism=mechanism,
            host=options.get("--host"),
            port=options.get("--port"),
        )
    sys.stdout.write(out + "\n")
    sys.stdout.flush()
    return 0


def sasl_response(
    user: str, token: str, *, mechanism: str, host: str | None = None, port: str | None = None
) -> str:
    """
    The base64 SASL initial client response.

    Args:
        user: the SASL user (the account's username).
        token: the access token.
        mechanism: "xoauth2" (Google/Microsoft's) or "oauthbearer" (RFC 7628).
        host: for OAUTHBEARER, the server's host name, if known.
        port: for OAUTHBEARER, the server's port, if known.
    """
    import binascii

    mechanism = mechanism.lower()
    if mechanism == "xoauth2":
        raw = f"user={user}\x01auth=Bearer {token}\x01\x01"
    elif mechanism == "oauthbearer":
        # RFC 5801 GS2 header: ',' and '=' in the authzid are escaped.
        authzid = user.replace("=", "=3D").replace(",", "=2C")
        fields = f"n,a={authzid},\x01"
        if host:
            fields += f"host={host}\x01"
        if port:
            fields += f"port={port}\x01"
        raw = f"{fields}auth=Bearer {token}\x01\x01"
    else:
        raise _usage(f"--mechanism must be xoauth2 or oauthbearer (got {mechanism!r})")
    return binascii.b2a_base64(raw.encode("utf-8"), newline=False).decode("ascii")


def candidate_sockets(socket_path: str | None) -> list[str]:
    """--socket, else $MAILOAUTHD_SOCKET, else the per-user then the system socket."""
    if socket_path:
        return [socket_path]
    return paths.helper_sockets(dict(os.environ), os.getuid())


def connect(socket_path: str | None, timeout: float | None) -> _socket.socket:
    """
    A connection to the daemon: the first candidate socket that answers.

    Raises:
        _Fail: none answered; the message names every path tried.
    """
    tried = candidate_sockets(socket_path)
    failures: list[str] = []
    for path in tried:
        candidate = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        candidate.settimeout(timeout)
        try:
            _connect(candidate, path, timeout)
        except OSError as exc:
            candidate.close()
            failures.append(f"{path}: {exc.strerror or exc}")
            continue
        return candidate
    raise _Fail(
        f"cannot reach mailoauthd: {'; '.join(failures)} ({unreachable_hint(socket_path)})",
        errors.EXIT_UNREACHABLE,
    )


def unreachable_hint(socket_path: str | None) -> str:
    """How to start the daemon the helper looked for: per-user, system, or a named socket."""
    if socket_path or os.environ.get("MAILOAUTHD_SOCKET"):
        return "start the mailoauthd that listens there, or check --socket and $MAILOAUTHD_SOCKET"
    if os.getuid() == 0 or os.path.exists(paths.SYSTEM_SOCKET):
        return "start it with 'systemctl start mailoauthd.socket mailoauthd', or pass --socket"
    return (
        "start your own with 'systemctl --user start mailoauthd' (or run 'mailoauthd'), "
        "or pass --socket"
    )


def _connect(sock: _socket.socket, path: str, timeout: float | None) -> None:
    """
    connect(), waiting while the daemon's listen queue is full.

    With a timeout set, a Unix socket's connect() fails at once with EAGAIN when the
    queue is full, where TCP would wait: a burst of mail connections would then read
    "cannot reach mailoauthd" from a daemon that is up and about to accept.
    """
    try:
        sock.connect(path)
        return
    except BlockingIOError:
        pass
    import time  # built into the interpreter: costs nothing, and only on this path

    deadline = time.monotonic() + (15.0 if timeout is None else timeout)
    pause = 0.001
    while True:
        if time.monotonic() + pause > deadline:
            raise BlockingIOError(11, "the daemon's listen queue stayed full")
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            continue


def request_reply(request: bytes, socket_path: str | None, timeout: float) -> dict[str, object]:
    """
    Send one request line and return the daemon's successful answer.

    Raises:
        _Fail: the daemon could not be reached, or answered with an error.
    """
    sock = connect(socket_path, timeout)
    try:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before it read our line: its answer may still be there to read
        chunks: list[bytes] = []
        size = 0
        while size <= protocol.MAX_LINE:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if chunk.endswith(b"\n"):
                break
    except TimeoutError:
        raise _Fail(
            f"mailoauthd did not answer within {timeout:g} s ({errors.TimedOut.hint})",
            errors.EXIT_TEMPORARY,
        ) from None
    except OSError as exc:
        raise _Fail(f"lost the connection to mailoauthd: {exc}", errors.EXIT_UNREACHABLE) from None
    finally:
        sock.close()
    try:
        reply = protocol.decode(b"".join(chunks))
    except protocol.WireError as exc:
        raise _Fail(f"mailoauthd sent a reply that is {exc}", errors.EXIT_ERROR) from None
    if reply.get("ok") is True:
        return reply
    code = str(reply.get("error", "error"))
    message = str(reply.get("message", "the daemon reported an error"))
    hint = reply.get("hint")
    names = reply.get("accounts")
    if code == "unknown-account" and isinstance(names, list):
        # Only on this failure path: difflib is not worth importing for every token.
        import difflib

        wanted = str(reply.get("account", ""))
        close = difflib.get_close_matches(wanted, [str(n) for n in names], 1)
        if close:
            hint = f"did you mean '{close[0]}'?"
    text = f"{message} ({hint})" if hint else message
    raise _Fail(text, errors.exit_code_for(code))
