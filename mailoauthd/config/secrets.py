"""
Client secrets, proxy passwords and sealing keys: where each comes from (`SecretSource`:
inline, a file or a command) and reading it, with errors that never show the secret.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mailoauthd.config.problems import ConfigProblems
from mailoauthd.secret import Secret

# 30 s: a password manager may wait for a GPG agent or a hardware key's touch;
# beyond that nobody is coming, and the daemon must not hang.
SECRET_COMMAND_TIMEOUT_SECONDS = 30
_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


@dataclass(frozen=True, slots=True, kw_only=True)
class SecretSource:
    """Where a client secret comes from: exactly one of inline, file and command."""

    inline: Secret | None = None
    file: Path | None = None  # "$VAR" and "${VAR}" are expanded when read
    command: tuple[str, ...] | None = None  # argv, never a shell string

    def __post_init__(self) -> None:
        if [self.inline, self.file, self.command].count(None) != 2:
            raise ValueError("a SecretSource needs exactly one of inline, file and command")

    @property
    def key(self) -> str:
        """The config key this came from, for `read(where=...)`."""
        if self.inline is not None:
            return "client_secret"
        return "client_secret_file" if self.file is not None else "client_secret_command"

    def read(self, *, where: str, env: Mapping[str, str] | None = None) -> Secret:
        """
        The secret: inline, or the file's content or the command's stdout, stripped.

        Args:
            where: the key for error messages, e.g. "providers.work.client_secret_file".
            env: for $VAR in the file path; the process environment by default.

        Raises:
            ConfigError: naming `where`, the file or program and the OS error or exit
                status; never the secret nor the command's output.
        """
        if self.inline is not None:
            return self.inline
        if self.file is not None:
            return _read_secret_file(self.file, where, os.environ if env is None else env)
        assert self.command is not None  # __post_init__ guarantees one source
        return _run_secret_command(self.command, where)


def _read_secret_file(path: Path, where: str, env: Mapping[str, str]) -> Secret:
    def expand(match: re.Match[str]) -> str:
        if (variable := match.group(1) or match.group(2)) in env:
            return env[variable]
        why = (
            "; systemd sets it for the service's LoadCredential= (to check the configuration "
            "outside the service: 'mailoauthd check-config --credentials-directory DIR')"
            if variable == "CREDENTIALS_DIRECTORY"
            else ""
        )
        raise ConfigProblems([f"{where}: {path} needs ${variable}, which is not set{why}"])

    expanded = _VARIABLE.sub(expand, str(path))
    try:
        value = Path(expanded).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigProblems([f"{where}: cannot read {expanded}: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError:
        # `from None`: the decoding error holds the file's bytes.
        raise ConfigProblems([f"{where}: {expanded} is not UTF-8 text"]) from None
    if not value:
        raise ConfigProblems([f"{where}: {expanded} is empty"])
    return Secret(value)


def _run_secret_command(argv: tuple[str, ...], where: str) -> Secret:
    program = f"{where}: {argv[0]!r}"
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=SECRET_COMMAND_TIMEOUT_SECONDS,
            check=False,
        )
    except OSError as exc:
        raise ConfigProblems([f"{program} cannot be run: {exc.strerror or exc}"]) from exc
    except subprocess.TimeoutExpired:
        # `from None` here and below: these exceptions carry what the command printed.
        seconds = SECRET_COMMAND_TIMEOUT_SECONDS
        raise ConfigProblems([f"{program} did not finish within {seconds} seconds"]) from None
    if done.returncode:
        code = done.returncode
        status = f"exited with status {code}" if code > 0 else f"was killed by signal {-code}"
        raise ConfigProblems([f"{program} {status}; run it yourself to see why"])
    try:
        value = done.stdout.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigProblems([f"{program} printed something that is not UTF-8 text"]) from None
    if not value:
        raise ConfigProblems([f"{program} printed nothing on stdout"])
    return Secret(value)


def secret_path(path: str, base_dir: Path) -> Path:
    """
    A secret file's path as written: relative to the configuration file's directory, or,
    when it starts with a variable, that variable's own directory (e.g. systemd's
    $CREDENTIALS_DIRECTORY), expanded when the file is read.
    """
    return Path(path) if path.startswith("$") else base_dir / path
