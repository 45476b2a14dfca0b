"""
The exception tree. Standard library only: the helper imports it.

    MailoauthdError                 code "error"               exit 1
    ├── UsageError                  "usage"                    exit 2
    ├── ConfigError                 "config"                   exit 1
    ├── DaemonUnreachable           "unreachable"              exit 3
    ├── ProtocolError               "bad-request"              exit 1
    ├── AccessDenied                "forbidden"                exit 1
    ├── UnknownAccount              "unknown-account"          exit 1
    ├── Busy                        "busy"                     exit 5
    ├── StateError                  "state"                    exit 1
    │   └── StateLocked             "state-locked"             exit 1
    └── GrantError                  "grant-error"              exit 1
        ├── TransientGrantError     "provider-unavailable"     exit 5
        ├── ReauthorizationRequired "needs-auth"               exit 4
        ├── Misconfigured           "misconfigured"            exit 1
        └── AuthorizationFailed     "authorization-failed"     exit 1

Every error has a `message` (what happened) and a `hint` (what to do). The
`code` travels on the wire and is API: never rename one. Transient failures and
"a human must sign in again" are different classes because callers do different
things with them: retry later, or stop and tell someone.

Every wire code has its home here: a class's `code`, or INTERNAL and CANCELLED;
`wire_codes()` lists those a reply may carry. The helper raises these too, and its
one `except MailoauthdError` turns them into its exit status through `exit_code`
(EXIT_CODES below, the only such mapping); an error the daemon reports comes back
as its class through `from_reply`.
"""

# Exit codes of the `mailoauth` helper, by wire code.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_NEEDS_AUTH = 4
EXIT_TEMPORARY = 5


# Wire codes that no exception class carries. `internal`: the daemon failed on a
# request in a way it did not foresee (lastresort.py). `cancelled`: the helper hung
# up during a sign-in (`authorize`), so the conversation ended without tokens.
INTERNAL = "internal"
CANCELLED = "cancelled"
# Codes of classes that live with what raises them (their modules import more than
# the standard library): seal.UnknownKey, etcd.EtcdError, etcd.Unavailable and
# etcd.TlsRefused, fleet.Superseded. Their `code` is one of these.
STATE_KEY = "state-key"
ETCD = "etcd"
ETCD_UNAVAILABLE = "etcd-unavailable"
ETCD_TLS = "etcd-tls"
STATE_SUPERSEDED = "state-superseded"
ELSEWHERE = (STATE_KEY, ETCD, ETCD_UNAVAILABLE, ETCD_TLS, STATE_SUPERSEDED)


def helper_command(*words: object) -> str:
    """
    The command a hint tells a person to run, quoted as every hint quotes it:
    helper_command("authorize", "work") is "'mailoauth authorize work'". Its one home,
    so that hints everywhere name the helper and its commands alike.
    """
    return "'mailoauth " + " ".join(str(word) for word in words) + "'"


def exit_code_for(code: str) -> int:
    """The helper's exit status for a wire error code; unknown codes are plain errors."""
    return EXIT_CODES.get(code, EXIT_ERROR)


class MailoauthdError(Exception):
    """The root of every error mailoauthd reports; carries a message and a hint."""

    code = "error"
    hint = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if hint is not None:
            self.hint = hint

    @property
    def exit_code(self) -> int:
        """The `mailoauth` helper's exit status for this error (EXIT_CODES)."""
        return exit_code_for(self.code)

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class UsageError(MailoauthdError):
    code = "usage"


class ConfigError(MailoauthdError):
    """A configuration mistake; the message names the file, the table and the key."""

    code = "config"
    hint = "fix the configuration file and run 'mailoauthd check-config'"


class DaemonUnreachable(MailoauthdError):
    code = "unreachable"
    hint = "start it with 'systemctl start mailoauthd' (or 'mailoauthd'), or pass --socket"


class ProtocolError(MailoauthdError):
    code = "bad-request"


class AccessDenied(MailoauthdError):
    code = "forbidden"


class UnknownAccount(MailoauthdError):
    code = "unknown-account"
    hint = "check the account name against 'mailoauth status'"


class Busy(MailoauthdError):
    code = "busy"
    hint = "try again in a moment"


class TimedOut(MailoauthdError):
    code = "timeout"
    hint = "the provider is slow or unreachable; try again, or see 'mailoauth status'"


class StateError(MailoauthdError):
    code = "state"


class StateLocked(StateError):
    code = "state-locked"
    hint = "another mailoauthd is using this state directory; stop it first"


class GrantError(MailoauthdError):
    """The token endpoint did not give us tokens."""

    code = "grant-error"

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        retry_after: float | None = None,
        oauth_error: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.retry_after = retry_after
        self.oauth_error = oauth_error
        # A refresh token found in an answer refused for another reason (a Secret):
        # under strict rotation it is the only one that still works, and must be kept.
        self.refresh_token: object = None


class TransientGrantError(GrantError):
    """Network trouble, timeouts, 5xx, 429: retried with backoff."""

    code = "provider-unavailable"
    hint = "this is usually temporary; mailoauthd keeps retrying"


class ReauthorizationRequired(GrantError):
    """The grant is gone (revoked, expired, consent withdrawn): a human must sign in again."""

    code = "needs-auth"
    hint = "run 'mailoauth authorize ACCOUNT' and sign in again"


class Misconfigured(GrantError):
    """The provider refuses our client or our request: the configuration must change."""

    code = "misconfigured"
    hint = "check client_id, client secret and scopes in the configuration"


class AuthorizationFailed(GrantError):
    """A sign-in did not yield tokens: declined, expired, a forged redirect, a refused code."""

    code = "authorization-failed"
    hint = "run 'mailoauth authorize ACCOUNT' again"


# The helper's exit status by wire code; any other code is EXIT_ERROR.
EXIT_CODES = {
    UsageError.code: EXIT_USAGE,
    DaemonUnreachable.code: EXIT_UNREACHABLE,
    ReauthorizationRequired.code: EXIT_NEEDS_AUTH,
    TransientGrantError.code: EXIT_TEMPORARY,
    Busy.code: EXIT_TEMPORARY,
    TimedOut.code: EXIT_TEMPORARY,
}


def from_reply(code: str, message: str, hint: str) -> MailoauthdError:
    """
    The error a daemon's failure reply names, as its class (its wire code kept when unknown).

    Args:
        code: the reply's "error" field.
        message: its "message".
        hint: its "hint" ("" for none: the class's own hint is not added).
    """
    kind = _by_code(MailoauthdError).get(code, MailoauthdError)
    error = kind(message, hint=hint)
    error.code = code
    return error


def _tree(root: type[MailoauthdError]) -> list[type[MailoauthdError]]:
    """`root` and every class below it, as far as they are imported."""
    return [root, *(kind for sub in root.__subclasses__() for kind in _tree(sub))]


def _by_code(root: type[MailoauthdError]) -> dict[str, type[MailoauthdError]]:
    found = {root.code: root}
    for sub in root.__subclasses__():
        found.update(_by_code(sub))
    return found


def wire_codes() -> frozenset[str]:
    """
    Every code a daemon's failure reply may carry: docs/protocol.md's table, checked by a test.

    The codes of the classes here, less the two no reply carries (the helper's
    own `unreachable`, and `state-locked`, which stops the daemon at start-up),
    the codes of the classes elsewhere (ELSEWHERE), and the codes no class
    carries (INTERNAL, CANCELLED).
    """
    here = {kind.code for kind in _tree(MailoauthdError) if kind.__module__ == __name__}
    on_the_wire = here - {DaemonUnreachable.code, StateLocked.code}
    return frozenset({*on_the_wire, *ELSEWHERE, INTERNAL, CANCELLED})
