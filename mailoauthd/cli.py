"""
The `mailoauthd` command: run (the default), check-config, rekey, demo.

This is the only place that reads the process environment and configures
logging; everything below takes what it needs as arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import structlog
import trio

from mailoauthd import __version__, config, daemon, logs, paths, proc
from mailoauthd.errors import ConfigError, MailoauthdError
from mailoauthd.secret import Secret
from mailoauthd.serve.access import Policy
from mailoauthd.storage import seal, state, store


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailoauthd",
        description="Keeps OAuth2 tokens of mail accounts fresh and serves them to "
        "'mailoauth token ACCOUNT' over a Unix socket.",
    )
    parser.add_argument("--version", action="version", version=f"mailoauthd {__version__}")
    parser.add_argument("--config", metavar="PATH", help="the configuration file")
    parser.add_argument(
        "--system",
        action="store_true",
        help="system mode: /etc/mailoauthd, /var/lib/mailoauthd, /run/mailoauthd "
        "(the default when run as root)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="run the daemon in the foreground (the default)")
    check = sub.add_parser("check-config", help="validate the configuration and exit 0 or 1")
    rekey = sub.add_parser(
        "rekey",
        help="re-seal every stored grant with the first key of [store]'s key source "
        "(stop the daemon first)",
    )
    for command in (run, check, rekey):
        # Also after the command: `mailoauthd check-config --config PATH`.
        command.add_argument(
            "--config", metavar="PATH", default=argparse.SUPPRESS, help="the configuration file"
        )
    for command in (check, rekey):
        command.add_argument(
            "--credentials-directory",
            metavar="DIR",
            help="read ${CREDENTIALS_DIRECTORY} in file paths as DIR: the directory holding "
            "the files the unit's LoadCredential= names (systemd sets the variable only for "
            "the service)",
        )
    sub.add_parser(
        "example-config",
        help="print an annotated example configuration (valid as it is, given its secret files)",
    )
    check.add_argument(
        "--online",
        action="store_true",
        help="also try each OAuth profile at its provider: discovery, endpoints, TLS, the "
        "client's ID and secret (nothing is stored)",
    )
    check.add_argument("--profile", metavar="NAME", help="with --online: only this profile")
    demo = sub.add_parser(
        "demo", help="run the daemon against a built-in development provider, with a demo account"
    )
    demo.add_argument("--socket", metavar="PATH", help="listen here instead of the default")
    demo.add_argument(
        "--token-lifetime",
        type=float,
        default=90.0,
        metavar="SECONDS",
        help="how long the demo provider's access tokens live (default 90)",
    )
    return parser


def _fail(exc: MailoauthdError, *, checking: bool = False) -> int:
    sys.stderr.write(f"mailoauthd: {exc.message}\n")
    hint = exc.hint
    if checking and isinstance(exc, ConfigError) and hint == ConfigError.hint:
        hint = "fix the configuration file"  # not "run check-config": that is what just ran
    if hint:
        sys.stderr.write(f"mailoauthd: {hint}\n")
    return 1


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def main(argv: list[str] | None = None) -> int:
    """The console entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    env = dict(os.environ)
    system = args.system or os.geteuid() == 0
    try:
        if args.command == "demo":
            return _demo(args, env)
        if args.command == "example-config":
            from mailoauthd import shared_files

            sys.stdout.write(shared_files.example_config())
            return 0
        path = Path(args.config or paths.config_path(env, system=system))
        cfg = config.load(path)
        if getattr(args, "credentials_directory", None):
            credentials = Path(args.credentials_directory).absolute()
            env = {**env, "CREDENTIALS_DIRECTORY": str(credentials)}
        if args.command == "check-config":
            return _check_config(cfg, path, args, env, system)
        if args.command == "rekey":
            return _rekey(cfg, env, system)
        return _run(cfg, path, env, system)
    except MailoauthdError as exc:
        return _fail(exc, checking=args.command == "check-config")


def _check_config(
    cfg: config.Config, path: Path, args: argparse.Namespace, env: dict[str, str], system: bool
) -> int:
    daemon.read_secrets(cfg, env)
    cfg.proxy_passwords(env)
    seal.load_keyring(cfg.store.encryption_key_file, cfg.store.encryption_key_command, env)
    _, access_warnings = Policy.build(cfg, system=system, own_uid=os.geteuid())
    warnings = [*cfg.warnings, *access_warnings]
    if not cfg.accounts:
        warnings.append(
            "there are no [accounts.NAME] tables: the daemon would serve no account "
            "('mailoauthd example-config' prints an annotated example)"
        )
    for warning in warnings:
        sys.stderr.write(f"mailoauthd: warning: {warning}\n")
    counts = f"{_plural(len(cfg.providers), 'provider')}, {_plural(len(cfg.accounts), 'account')}"
    print(f"{path}: OK ({counts})")
    if args.online:
        from mailoauthd.provider import probe

        return probe.run(cfg, daemon.read_secrets(cfg, env), args.profile)
    return 0


def _run(
    cfg: config.Config,
    path: Path | None,
    env: dict[str, str],
    system: bool,
    on_ready: Callable[[], None] | None = None,
) -> int:
    journal = logs.JOURNAL_SOCKET if logs.stderr_is_journal(env) else None
    logs.configure(level=cfg.daemon.log_level, fmt=cfg.daemon.log_format, journal=journal)
    for problem in proc.forbid_core_dumps():  # no core file with tokens in it, no ptrace
        structlog.get_logger(__name__).warning("daemon.core_dumps_possible", reason=problem)
    # Socket activation's variables are ours alone (daemon.run reads them from `env`):
    # programs we start, such as a client_secret_command, must not see them.
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    proc.raise_fd_limit()
    failures: list[MailoauthdError] = []
    run = partial(daemon.run, cfg, config_path=path, env=env, system=system)

    async def run_then_tell() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(run)
            if on_ready is not None:
                on_ready()

    try:
        trio.run(run_then_tell)
    except* MailoauthdError as group:
        failures.extend(_leaves(group))
    for failure in failures:
        _fail(failure)
    return 1 if failures else 0


def _rekey(cfg: config.Config, env: dict[str, str], system: bool) -> int:
    if cfg.store.encryption_key_file is None and cfg.store.encryption_key_command is None:
        raise ConfigError(
            f"{cfg.source}: [store]: no encryption_key_file or encryption_key_command; "
            "nothing to seal with"
        )
    if cfg.store.backend == "etcd":
        raise ConfigError(
            f"{cfg.source}: [store]: rekey works on a state directory; a fleet's grants in "
            "etcd are sealed with the first key as they are refreshed (docs/fleet.md)"
        )
    state_dir = cfg.daemon.state_dir or Path(paths.state_dir(env, system=system))
    grants = store.open_store(cfg.store, state_dir, env)
    try:
        done = store.rekey(grants)
    finally:
        grants.close()
    assert grants.keyring is not None
    for failure in done.failed:
        _fail(failure)
    print(
        f"{state_dir}: {len(done.sealed)} grants sealed with key {grants.keyring.sealing_id}"
        + (f"; {len(done.failed)} unreadable, kept as they are" if done.failed else "")
    )
    return 1 if done.failed else 0


def _leaves(group: BaseExceptionGroup[MailoauthdError]) -> list[MailoauthdError]:
    found: list[MailoauthdError] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found.extend(_leaves(exc))
        else:
            found.append(exc)
    return found


DEMO_CONFIG = """\
# Written by 'mailoauthd demo': a development provider on 127.0.0.1 and one account.
[daemon]
refresh_interval = "15s"
refresh_before = "{refresh_before}s"
refresh_spread = "0s"
min_validity = "{min_validity}s"
state_dir = "{state_dir}"
socket = "{socket}"
log_format = "auto"

[providers.demo]
preset = "generic"
client_id = "demo-client"
client_secret_file = "{secret_file}"
token_endpoint = "{token_endpoint}"
revocation_endpoint = "{revocation_endpoint}"

[accounts.demo]
provider = "demo"
username = "demo@example.com"
"""


def _demo(args: argparse.Namespace, env: dict[str, str]) -> int:
    """
    The demo: always per-user mode, also as root, and never the system's paths.

    Its socket is the per-user one when there is a runtime directory to put it in
    (so that a plain `mailoauth token demo` finds it), else one in its own
    temporary directory; its banner comes once the daemon listens.
    """
    from mailoauthd.testing import DevProvider

    lifetime = max(30.0, args.token_lifetime)
    with (
        tempfile.TemporaryDirectory(prefix="mailoauthd-demo-") as tmp,
        DevProvider(access_token_lifetime=lifetime) as provider,
    ):
        base = Path(tmp)
        runtime = env.get("XDG_RUNTIME_DIR", "")
        if args.socket:
            socket = Path(args.socket)
        elif os.geteuid() != 0 and runtime and os.path.isdir(runtime):
            socket = Path(paths.user_socket(env, os.getuid()))
        else:
            socket = base / "socket"
        secret_file = base / "client-secret"
        secret_file.write_text("demo-secret\n")
        secret_file.chmod(0o600)
        endpoints = provider.endpoints
        config_file = base / "config.toml"
        config_file.write_text(
            DEMO_CONFIG.format(
                refresh_before=int(lifetime / 3),
                min_validity=int(lifetime / 9),
                state_dir=base / "state",
                socket=socket,
                secret_file=secret_file,
                token_endpoint=endpoints["token_endpoint"],
                revocation_endpoint=endpoints["revocation_endpoint"],
            )
        )
        cfg = config.load(config_file)
        # Bootstrapped as a person would after signing in: with a refresh token.
        store = state.TokenStore(base / "state")
        store.open()
        refresh_token = provider.issue_refresh_token("demo@example.com")
        store.save(state.imported("demo", Secret(refresh_token), datetime.now(UTC)))
        store.close()
        helper = Path(sys.executable).with_name("mailoauth")
        command = str(helper) if helper.exists() else "mailoauth"
        default = paths.helper_sockets(env, os.getuid())[0]
        flag = "" if str(socket) == default else f" --socket {socket}"

        def banner() -> None:
            sys.stderr.write(
                f"mailoauthd demo: development provider at {provider.url}, "
                f"access tokens live {lifetime:g} s\n"
                f"mailoauthd demo: in another terminal, try:\n"
                f"    {command}{flag} token demo\n"
                f"    {command}{flag} status\n"
                f"mailoauthd demo: Ctrl-C stops the demo.\n"
            )

        return _run(cfg, config_file, env, False, on_ready=banner)
