"""
`mailoauth authorize`: the person's side of a sign-in, at a terminal. Standard library only.

The daemon runs the sign-in (signin.py); this shows a person what to do and
relays what they paste. One connection for the whole sign-in (docs/protocol.md):
the request line, then event lines from the daemon until a final answer with
"ok", while each line typed or piped on stdin goes back as a pasted address.
Closing the connection (Ctrl-C) cancels the sign-in.
"""

from __future__ import annotations

import json
import os
import select
import shlex
import subprocess
import sys
import tempfile

from mailoauthd import errors, protocol
from mailoauthd.helper import transport

# The daemon gives up on a sign-in after 10 minutes and a device code after at
# most 30; silence for longer than this means it is gone.
IDLE_TIMEOUT = 2100.0
# An opener (xdg-open, wslview, VS Code's helper) hands the address on and exits at
# once; one still running after this is a browser in the foreground: it opened.
OPENER_TIMEOUT = 10.0


def say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _warn(text: str) -> None:
    sys.stderr.write(f"mailoauth: {text}\n")
    sys.stderr.flush()


def _minutes(seconds: object) -> str:
    if not isinstance(seconds, int | float) or seconds <= 0:
        return "a while"
    minutes = round(seconds / 60)
    return f"{minutes} minute{'s' if minutes != 1 else ''}" if minutes else f"{seconds:g} seconds"


def _graphical() -> bool:
    """A browser can open where the person sits: a display here, or a Mac."""
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) or (
        sys.platform == "darwin"
    )


def _run_opener(command: str, url: str) -> str | None:
    """
    Open `url` with one opener command: its words (shell-style quoting), with %s
    replaced by the address, or the address appended when there is no %s.

    Returns:
        None when it worked (exit status 0, or still running after
        OPENER_TIMEOUT: a browser in the foreground), else why not.
    """
    try:
        words = shlex.split(command)
    except ValueError as exc:
        return f"cannot read the command: {exc}"
    if not words:
        return "the command is empty"
    argv = [word.replace("%s", url) for word in words]
    if not any("%s" in word for word in words):
        argv.append(url)
    with tempfile.TemporaryFile() as errors_file:
        try:
            child = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors_file
            )
        except OSError as exc:
            return exc.strerror or str(exc)
        try:
            status = child.wait(OPENER_TIMEOUT)
        except subprocess.TimeoutExpired:
            return None
        if status == 0:
            return None
        errors_file.seek(0)
        said = errors_file.read(4096).decode("utf-8", "replace").split()
    said_text = " ".join(said)[:200]
    return f"exit status {status}" + (f": {said_text}" if said_text else "")


def _open_browser(url: str, command: str | None) -> tuple[str | None, str | None]:
    """
    Open `url`: with `command` (--browser-command), else with each command of $BROWSER
    (os.pathsep-separated, whatever DISPLAY says: it is the person's choice), else with
    Python's default browser where there is a display.

    Returns:
        (what opened it, None), or (None, why nothing did); (None, None) when nothing was
        tried.
    """
    commands = [command] if command is not None else None
    if commands is None and os.environ.get("BROWSER", "").strip():
        commands = [c for c in os.environ["BROWSER"].split(os.pathsep) if c.strip()]
    if commands is not None:
        failures = []
        for each in commands:
            why = _run_opener(each, url)
            if why is None:
                return each, None
            failures.append(f"'{each}' failed ({why})")
        return None, "; ".join(failures)
    if not _graphical():
        return None, None
    import webbrowser

    try:
        browser = webbrowser.get()
        if browser.open(url, new=1):
            return getattr(browser, "name", None) or "the default browser", None
    except webbrowser.Error:
        pass
    return None, "no browser could be started"


def _stdin_fd() -> int | None:
    try:
        return sys.stdin.fileno() if sys.stdin is not None else None
    except (AttributeError, ValueError, OSError):
        return None


def event(
    account: str, message: dict[str, object], *, open_browser: bool, browser_command: str | None
) -> bool:
    """
    Show one event.

    Returns:
        True when the person may now paste an address.
    """
    event = message.get("event")
    if event == "authorize":
        url = str(message.get("url"))
        say(f"To sign in to {account}, open this address in a browser:")
        say()
        say(f"    {url}")
        say()
        if open_browser:
            opened, why = _open_browser(url, browser_command)
            if opened is not None:
                say(f"(Opened it with {opened}.)")
            elif why is not None:
                say(f"(Could not open a browser: {why}; open the address yourself.)")
        say(
            f"Waiting up to {_minutes(message.get('expires_in'))} for the browser to come back "
            f"to {message.get('redirect_uri')}."
        )
        say(
            "If the browser runs on another machine, the last page will fail to load: copy its "
            "address from the address bar, paste it here and press Enter."
        )
        return True
    if event == "device":
        say(f"To sign in to {account}, visit")
        say()
        say(f"    {message.get('verification_uri')}")
        say()
        say(f"and enter the code  {message.get('user_code')}")
        if message.get("verification_uri_complete"):
            say(f"(or open {message.get('verification_uri_complete')} to skip typing it).")
        say(f"The code is good for {_minutes(message.get('expires_in'))}; waiting for you...")
    elif event == "exchanging":
        say("Got the provider's answer; fetching the tokens...")
    elif event == "rejected":
        hint = f" ({message.get('hint')})" if message.get("hint") else ""
        _warn(f"{account}: not accepted: {message.get('message')}{hint}")
    elif event == "slow_down":
        say(f"The provider asked us to check less often: every {message.get('interval')} s.")
    elif event == "retrying":
        say(f"The provider is not answering ({message.get('message')}); trying again.")
    return False


def run(
    account: str,
    *,
    socket_path: str | None,
    flow: str | None,
    open_browser: bool,
    browser_command: str | None = None,
) -> int:
    """
    Sign in to `account` through the daemon; returns the exit status.

    Args:
        account: the account's name.
        socket_path: --socket, if given.
        flow: "authorization_code" or "device_code"; None for the account's own.
        open_browser: try to open the URL in a browser (not with --no-browser).
        browser_command: --browser-command, if given: open the URL with this instead.

    Raises:
        MailoauthdError: the daemon could not be reached, or the sign-in failed.
    """
    request: dict[str, object] = {"v": protocol.VERSION, "op": "authorize", "account": account}
    if flow:
        request["flow"] = flow
    sock = transport.connect(socket_path, None)
    try:
        sock.sendall(protocol.encode(request))
        received = b""
        typed = b""
        stdin = None  # read once the daemon has asked for a pasted address
        while True:
            watched = [sock.fileno()] + ([stdin] if stdin is not None else [])
            ready, _, _ = select.select(watched, [], [], IDLE_TIMEOUT)
            if not ready:
                raise errors.TimedOut(
                    f"{account}: mailoauthd said nothing for {IDLE_TIMEOUT:g} s", hint=""
                )
            if stdin is not None and stdin in ready:
                data = os.read(stdin, 65536)
                typed += data or b"\n"
                if not data:
                    stdin = None  # end of input: from now on only the browser can answer
                *lines, typed = typed.split(b"\n")
                for line in lines:
                    if text := line.decode("utf-8", "replace").strip():
                        sock.sendall(protocol.encode({"op": "redirect", "url": text}))
                        say("Checking that address...")
            if sock.fileno() not in ready:
                continue
            chunk = sock.recv(65536)
            if not chunk:
                raise errors.MailoauthdError(
                    f"{account}: mailoauthd closed the connection before the sign-in finished"
                )
            received += chunk
            *lines, received = received.split(b"\n")
            for line in lines:
                try:
                    message = json.loads(line)
                except ValueError:
                    raise errors.MailoauthdError(
                        "mailoauthd sent a line that is not JSON"
                    ) from None
                if not isinstance(message, dict):
                    continue
                if "ok" in message:
                    return _finish(account, message)
                if event(
                    account, message, open_browser=open_browser, browser_command=browser_command
                ):
                    stdin = _stdin_fd()
    except OSError as exc:
        raise errors.DaemonUnreachable(
            f"lost the connection to mailoauthd: {exc}", hint=""
        ) from None
    finally:
        sock.close()


def _finish(account: str, reply: dict[str, object]) -> int:
    if reply.get("ok") is not True:
        code = str(reply.get("error", "error"))
        hint = reply.get("hint") or ""
        raise errors.from_reply(code, str(reply.get("message")), str(hint))
    if reply.get("expires_at"):
        say(f"{account}: signed in; access token valid until {reply.get('expires_at')}.")
    if reply.get("note"):
        _warn(f"{account}: {reply.get('note')}")
    return errors.EXIT_OK
