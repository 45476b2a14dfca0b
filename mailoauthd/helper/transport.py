"""
The helper's transport: which socket to try, one request line out, one reply line back.

Standard library only, and cheap: `mailoauth token` goes through here on every
mail connection, so it uses the C `_socket` module rather than `socket`
(fastpath.sockets, which falls back to `socket` where `_socket` is missing).
A failure is raised as the errors.py class it is: DaemonUnreachable, TimedOut,
or the one the daemon's reply names; `errors` is imported there, so that a
token handed out never loads it.
"""

import os

from mailoauthd import paths, protocol
from mailoauthd.fastpath import sockets  # `_socket`: `socket` costs a visible share of start-up

# How long a token request waits for a due refresh unless --timeout says otherwise.
DEFAULT_TIMEOUT = 15.0
# `--wait` alone: five minutes to notice, run `mailoauth authorize` and sign in.
DEFAULT_WAIT = 300.0
# Time we allow the daemon beyond the request's own timeout to answer, so that
# its "provider timed out" reply reaches us instead of our own socket timeout.
ANSWER_GRACE = 5.0


def candidate_sockets(socket_path: str | None) -> list[str]:
    """--socket, else $MAILOAUTHD_SOCKET, else the per-user then the system socket."""
    if socket_path:
        return [socket_path]
    return paths.helper_sockets(dict(os.environ), os.getuid())


def connect(socket_path: str | None, timeout: float | None) -> sockets.socket:
    """
    A connection to the daemon: the first candidate socket that answers.

    Raises:
        DaemonUnreachable: none answered; the message names every path tried.
    """
    tried = candidate_sockets(socket_path)
    failures: list[str] = []
    for path in tried:
        candidate = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
        candidate.settimeout(timeout)
        try:
            _connect(candidate, path, timeout)
        except OSError as exc:
            candidate.close()
            failures.append(f"{path}: {exc.strerror or exc}")
            continue
        return candidate
    from mailoauthd import errors  # on failure only (see above)

    raise errors.DaemonUnreachable(
        f"cannot reach mailoauthd: {'; '.join(failures)}", hint=unreachable_hint(socket_path)
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


def _connect(sock: sockets.socket, path: str, timeout: float | None) -> None:
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
        MailoauthdError: the daemon could not be reached (DaemonUnreachable), did not
            answer in time (TimedOut), or answered with an error (the class it names).
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
        from mailoauthd import errors  # on failure only (see above)

        raise errors.TimedOut(f"mailoauthd did not answer within {timeout:g} s") from None
    except OSError as exc:
        from mailoauthd import errors

        raise errors.DaemonUnreachable(
            f"lost the connection to mailoauthd: {exc}", hint=""
        ) from None
    finally:
        sock.close()
    try:
        reply = protocol.decode(b"".join(chunks))
    except protocol.WireError as exc:
        from mailoauthd import errors

        raise errors.MailoauthdError(f"mailoauthd sent a reply that is {exc}") from None
    if reply.get("ok") is True:
        return reply
    from mailoauthd import errors

    code = str(reply.get("error", errors.MailoauthdError.code))
    message = str(reply.get("message", "the daemon reported an error"))
    hint = reply.get("hint") or ""
    names = reply.get("accounts")
    if code == errors.UnknownAccount.code and isinstance(names, list):
        # Only on this failure path: difflib is not worth importing for every token.
        import difflib

        wanted = str(reply.get("account", ""))
        close = difflib.get_close_matches(wanted, [str(n) for n in names], 1)
        if close:
            hint = f"did you mean '{close[0]}'?"
    raise errors.from_reply(code, message, str(hint))
