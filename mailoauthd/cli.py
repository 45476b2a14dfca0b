"""
The `mailoauthd` command: run (the default), check-config, demo.

This is the only place that reads the process environment and configures
logging; everything below takes what it needs as arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import trio

from mailoauthd import __version__, config, daemon, logs, paths, proc, state
from mailoauthd.access import Policy
from mailoauthd.errors import MailoauthdError
from mailoauthd.secret import Secret


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
    sub.add_parser("run", help="run the daemon in the foreground (the default)")
    sub.add_parser("check-config", help="validate the configuration and exit 0 or 1")
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


def _fail(exc: MailoauthdError) -> int:
    sys.stderr.write(f"mailoauthd: {exc.message}\n")
    if exc.hint:
        sys.stderr.write(f"mailoauthd: {exc.hint}\n")
    return 1


def main(argv: list[str] | None = None) -> int:
    """The console entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    env = dict(os.environ)
    system = args.system or os.geteuid() == 0
    try:
        if args.command == "demo":
            return _demo(args, env, system)
        path = Path(args.config or paths.config_path(env, system=system))
        cfg = config.load(path)
        if args.command == "check-config":
            daemon.read_secrets(cfg)
            _, access_warnings = Policy.build(cfg, system=system, own_uid=os.geteuid())
            for warning in (*cfg.warnings, *access_warnings):
                sys.stderr.write(f"mailoauthd: warning: {warning}\n")
            print(f"{path}: OK ({len(cfg.providers)} providers, {len(cfg.accounts)} accounts)")
            return 0
        return _run(cfg, path, env, system)
    except MailoauthdError as exc:
        return _fail(exc)


def _run(cfg: config.Config, path: Path | None, env: dict[str, str], system: bool) -> int:
    journal = logs.JOURNAL_SOCKET if logs.stderr_is_journal(env) else None
    logs.configure(level=cfg.daemon.log_level, fmt=cfg.daemon.log_format, journal=journal)
    # Socket activation's variables are ours alone (daemon.run reads them from `env`):
    # programs we start, such as a client_secret_command, must not see them.
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    proc.set_non_dumpable()  # no core file with tokens in it, no ptrace by our own uid
    proc.raise_fd_limit()
    failures: list[MailoauthdError] = []
    try:
        trio.run(partial(daemon.run, cfg, config_path=path, env=env, system=system))
    except* MailoauthdError as group:
        failures.extend(_leaves(group))
    for failure in failures:
        _fail(failure)
    return 1 if failures else 0


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


def _demo(args: argparse.Namespace, env: dict[str, str], system: bool) -> int:
    from mailoauthd.devprovider import DevProvider

    socket = Path(args.socket or paths.daemon_socket(env, os.getuid(), system=system))
    lifetime = max(30.0, args.token_lifetime)
    with (
        tempfile.TemporaryDirectory(prefix="mailoauthd-demo-") as tmp,
        DevProvider(access_token_lifetime=lifetime) as provider,
    ):
        base = Path(tmp)
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
        flag = "" if args.socket is None else f" --socket {socket}"
        sys.stderr.write(
            f"mailoauthd demo: development provider at {provider.url}, "
            f"access tokens live {lifetime:g} s\n"
            f"mailoauthd demo: in another terminal, try:\n"
            f"    {command}{flag} token demo\n"
            f"    {command}{flag} status\n"
            f"mailoauthd demo: Ctrl-C stops the demo.\n"
        )
        return _run(cfg, config_file, env, system)
