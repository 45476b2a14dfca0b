"""
`mailoauth`'s entry point, and its quick path: `token` and `sasl`, parsed without argparse.

Mail programs spawn `mailoauth token ACCOUNT` once per connection, so the
`token` and `sasl` paths import nothing beyond what the interpreter has already
loaded plus two C modules (`_socket`, `_json`) and `binascii`; no argparse, no
json, no pathlib, and not even `__future__` (this module, transport, errors,
protocol, fastpath and paths spell their annotations for Python 3.11 as it runs
them). A token handed out does not even load `errors`: this module and transport
import it where something failed. A test holds us to that. Every other command goes to
commands.py, imported only then.

Every failure is a MailoauthdError; `main` is the one place that turns it into
one line on stderr and its exit status (errors.EXIT_CODES): 0 success, 1 error
reported by the daemon, 2 usage, 3 daemon unreachable, 4 needs authorization,
5 provider temporarily failing.
"""

import sys

from mailoauthd import protocol
from mailoauthd.helper.transport import ANSWER_GRACE, DEFAULT_TIMEOUT, DEFAULT_WAIT, request_reply

# mypy reads `if TYPE_CHECKING:` as true whatever defines the name; `errors` is
# imported where a failure needs it (see above), and here only for annotations.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from mailoauthd import errors

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
        from mailoauthd.helper import commands

        return commands.main(argv)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from mailoauthd import errors  # loaded on failure only (see above)

        if not isinstance(exc, errors.MailoauthdError):
            raise
        sys.stderr.write(f"mailoauth: {exc}\n")
        return exc.exit_code


def _leading_socket(argv: list[str]) -> tuple[str | None, list[str]]:
    """Split off a `--socket PATH` / `--socket=PATH` given before the command."""
    if argv and argv[0].startswith("--socket="):
        return argv[0].partition("=")[2], argv[1:]
    if len(argv) >= 2 and argv[0] == "--socket":
        return argv[1], argv[2:]
    return None, argv


def _usage(message: str) -> "errors.UsageError":
    from mailoauthd import errors  # loaded on failure only (see above)

    return errors.UsageError(f"{message}\n{USAGE}")


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
        from mailoauthd import errors  # loaded on failure only (see above)

        raise errors.MailoauthdError(f"{account}: the daemon sent no token")
    if command == "token":
        out = token
    else:
        from mailoauthd.helper.sasl import sasl_response

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
