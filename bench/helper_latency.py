"""
Benchmark 1: the wall time of `mailoauth token ACCOUNT`, next to what users would run instead.

Every command is spawned the way a mail program spawns its password command
(posix_spawn, output to /dev/null) and timed from spawn to exit. The commands
take turns within each round, in a shuffled order, so that whatever else the
machine does falls on all of them alike; each figure is the median over the
rounds, and each ratio compares medians of the same run.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from common import Daemon, Install, log, median, percentile, write_config

from mailoauthd import config as config_module
from mailoauthd.testing import DevProvider

ACCOUNT = "bench"
MUTT_EXAMPLES = Path("/usr/share/doc/mutt/examples")
GPG_IDENTITY = "mailoauthd-bench@example.invalid"
# The interpreter Debian's mutt_oauth2.py runs on: its shebang is
# `/usr/bin/env python3`, which is this on a stock Debian PATH.
DEBIAN_PYTHON = Path("/usr/bin/python3")


@dataclass
class Command:
    """One program to time."""

    key: str
    label: str
    argv: list[str]
    env: dict[str, str]
    expect: str | None = None  # what it must print, checked once before timing
    wall: list[float] = dataclasses.field(default_factory=list)
    cpu: list[float] = dataclasses.field(default_factory=list)

    def summary(self) -> dict[str, object]:
        return {
            "label": self.label,
            "argv": self.argv,
            "median_ms": median(self.wall) * 1e3,
            "p90_ms": percentile(self.wall, 0.9) * 1e3,
            "min_ms": min(self.wall) * 1e3,
            "cpu_ms": median(self.cpu) * 1e3,
            "runs": len(self.wall),
        }


def spawn_and_wait(command: Command, devnull: int) -> tuple[float, float]:
    """Run once; returns (wall seconds, CPU seconds of the child)."""
    actions = [
        (os.POSIX_SPAWN_DUP2, devnull, 0),
        (os.POSIX_SPAWN_DUP2, devnull, 1),
        (os.POSIX_SPAWN_DUP2, devnull, 2),
    ]
    started = time.perf_counter()
    pid = os.posix_spawn(command.argv[0], command.argv, command.env, file_actions=actions)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{command.label} failed ({status}): {' '.join(command.argv)}")
    return wall, usage.ru_utime + usage.ru_stime


def check_output(command: Command) -> None:
    """Run once with output captured: the benchmark must time a command that works."""
    run = subprocess.run(command.argv, env=command.env, capture_output=True, text=True, check=False)
    if run.returncode != 0 or (command.expect is not None and run.stdout != command.expect):
        raise RuntimeError(
            f"{command.label}: exit {run.returncode}, stdout {run.stdout[:80]!r}, "
            f"stderr {run.stderr[-400:]!r}"
        )


def time_commands(commands: Sequence[Command], rounds: int, warmup: int) -> None:
    """Interleaved rounds: each round runs every command once, in a new random order."""
    rng = random.Random(7)  # noqa: S311 - an order, not a secret
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        for round_number in range(warmup + rounds):
            order = list(commands)
            rng.shuffle(order)
            for command in order:
                wall, cpu = spawn_and_wait(command, devnull)
                if round_number >= warmup:
                    command.wall.append(wall)
                    command.cpu.append(cpu)
    finally:
        os.close(devnull)


# --- mutt_oauth2.py ------------------------------------------------------------------


def find_mutt_oauth2() -> Path | None:
    for name in ("mutt_oauth2.py", "mutt_oauth2.py.gz"):
        if (MUTT_EXAMPLES / name).exists():
            return MUTT_EXAMPLES / name
    return None


def gpg_env(home: Path) -> dict[str, str]:
    return {**os.environ, "GNUPGHOME": str(home)}


def make_gpg_key(home: Path) -> None:
    """A passphrase-less key, as mutt_oauth2.py's README suggests for unattended use."""
    home.mkdir(mode=0o700)
    subprocess.run(
        [
            "gpg",
            "--batch",
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            "",
            "--quick-gen-key",
            f"mailoauthd bench <{GPG_IDENTITY}>",
            "default",
            "default",
            "never",
        ],
        env=gpg_env(home),
        capture_output=True,
        check=True,
    )


def mutt_oauth2_command(base: Path, token: str, python: str) -> tuple[Command, Command]:
    """
    Debian's mutt_oauth2.py with a GPG-encrypted token file holding a valid token.

    The only edit is the one its comments ask every user to make: the GPG
    identity in ENCRYPTION_PIPE. The token file is what `--authorize` would
    have written: the same JSON, encrypted with the script's own pipe.

    Returns:
        The script's command, and its decryption step (gpg --decrypt) alone.
    """
    source = find_mutt_oauth2()
    if source is None:
        raise RuntimeError("mutt_oauth2.py not found: install Debian's mutt (bench/setup.sh)")
    raw = gzip.decompress(source.read_bytes()) if source.suffix == ".gz" else source.read_bytes()
    script = base / "mutt_oauth2.py"
    script.write_bytes(raw.replace(b"YOUR_GPG_IDENTITY", GPG_IDENTITY.encode()))
    script.chmod(0o755)
    home = base / "gnupg"
    make_gpg_key(home)
    record = {
        "registration": "microsoft",
        "authflow": "authcode",
        "email": f"{ACCOUNT}@example.com",
        "access_token": token,
        # Naive local time, as the script writes it.
        "access_token_expiration": (datetime.now() + timedelta(hours=1)).isoformat(),
        "refresh_token": "unused-while-the-access-token-is-valid",
    }
    encrypted = subprocess.run(
        ["gpg", "--encrypt", "--recipient", GPG_IDENTITY],
        input=json.dumps(record).encode(),
        env=gpg_env(home),
        capture_output=True,
        check=True,
    ).stdout
    token_file = base / "mutt-token"
    token_file.write_bytes(encrypted)
    token_file.chmod(0o600)
    env = gpg_env(home)
    gpg = shutil.which("gpg") or "/usr/bin/gpg"
    return (
        Command(
            "mutt_oauth2",
            "`mutt_oauth2.py TOKENFILE` (Debian's mutt; GPG token file, warm agent)",
            [python, str(script), str(token_file)],
            env,
            expect=token + "\n",
        ),
        Command(
            "gpg",
            "`gpg --decrypt TOKENFILE` (mutt_oauth2.py's decryption step alone)",
            [gpg, "--quiet", "--batch", "--decrypt", str(token_file)],
            env,
        ),
    )


# --- the helper ----------------------------------------------------------------------


def console_script_wrapper(base: Path, install: Install) -> Path:
    """The wrapper pip generates for a [project.scripts] entry point, for comparison."""
    wrapper = base / "mailoauth-console-script"
    wrapper.write_text(
        f"#!{install.python}\n"
        "# -*- coding: utf-8 -*-\n"
        "import re\n"
        "import sys\n"
        "from mailoauthd.helper.token import main\n"
        "if __name__ == '__main__':\n"
        "    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
        "    sys.exit(main(sys.argv[1:]))\n"
    )
    wrapper.chmod(0o755)
    return wrapper


def supports_token_file() -> bool:
    return "token_file" in {f.name for f in dataclasses.fields(config_module.Account)}


def import_times(python: Path, args: list[str], env: dict[str, str], runs: int) -> dict[str, float]:
    """Median self time (µs) of each module `python ARGS` imports, from -X importtime."""
    samples: dict[str, list[float]] = {}
    for _ in range(runs):
        run = subprocess.run(
            [str(python), "-X", "importtime", *args],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        for line in run.stderr.splitlines():
            if line.startswith("import time:") and "|" in line and "self [us]" not in line:
                self_us, _, name = line[len("import time:") :].split("|")
                samples.setdefault(name.strip(), []).append(float(self_us))
    return {name: median(values) for name, values in samples.items()}


def run(
    install: Install, base: Path, *, rounds: int, warmup: int, with_mutt: bool
) -> dict[str, object]:
    """Measure; returns the figures for the report."""
    base.mkdir(parents=True, exist_ok=True)
    result: dict[str, object] = {"rounds": rounds, "warmup": warmup}
    with DevProvider() as provider:
        token_path = base / "token"
        keys = {ACCOUNT: f'token_file = "{token_path}"'} if supports_token_file() else {}
        config_path = write_config(base, provider, [ACCOUNT], account_keys=keys)
        daemon = Daemon(install, config_path, base / "run" / "socket", base / "daemon.log")
        daemon.start()
        try:
            helper_env = {**os.environ, "MAILOAUTHD_SOCKET": str(daemon.socket_path)}
            refresh_token = provider.issue_refresh_token(f"{ACCOUNT}@example.com")
            subprocess.run(
                [str(install.mailoauth), "import", ACCOUNT],
                input=refresh_token + "\n",
                env=helper_env,
                capture_output=True,
                text=True,
                check=True,
            )
            token = subprocess.run(
                [str(install.mailoauth), "token", ACCOUNT],
                env=helper_env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            if keys:
                deadline = time.monotonic() + 10
                while not token_path.exists() and time.monotonic() < deadline:
                    time.sleep(0.01)
                result["token_file"] = "the account's `token_file`, written by the daemon"  # noqa: S105
            if not token_path.exists():
                token_path.write_text(token + "\n")
                token_path.chmod(0o600)
                result["token_file"] = "a file with the token (no `token_file` yet)"  # noqa: S105
            commands = [
                Command(
                    "helper",
                    "`mailoauth token ACCOUNT` (the helper, as installed)",
                    [str(install.mailoauth), "token", ACCOUNT],
                    helper_env,
                    expect=token + "\n",
                ),
                Command(
                    "floor",
                    "`python -I -c pass` (same venv: the floor of a Python helper)",
                    [str(install.python), "-I", "-c", "pass"],
                    dict(os.environ),
                ),
                Command(
                    "cat",
                    "`cat TOKEN_FILE` (the floor of any helper)",
                    [shutil.which("cat") or "/bin/cat", str(token_path)],
                    dict(os.environ),
                    expect=token + "\n",
                ),
                Command(
                    "wrapper",
                    "the same helper behind pip's console-script wrapper (for comparison)",
                    [str(console_script_wrapper(base, install)), "token", ACCOUNT],
                    helper_env,
                    expect=token + "\n",
                ),
            ]
            if with_mutt:
                python = str(DEBIAN_PYTHON) if DEBIAN_PYTHON.exists() else sys.executable
                mutt, gpg = mutt_oauth2_command(base, token, python)
                commands += [
                    mutt,
                    gpg,
                    Command(
                        "mutt_floor",
                        f"`{python} -I -c pass` (the interpreter mutt_oauth2.py runs on)",
                        [python, "-I", "-c", "pass"],
                        dict(os.environ),
                    ),
                ]
            for command in commands:
                check_output(command)
            log(f"helper latency: {len(commands)} commands x {rounds} rounds")
            time_commands(commands, rounds, warmup)
            result["commands"] = {c.key: c.summary() for c in commands}
            helper_imports = import_times(
                install.python,
                [str(install.mailoauth), "token", ACCOUNT],
                helper_env,
                min(15, rounds),
            )
            floor_imports = import_times(
                install.python, ["-I", "-c", "pass"], dict(os.environ), min(15, rounds)
            )
            result["imports"] = {
                name: us for name, us in helper_imports.items() if name not in floor_imports
            }
            result["editable"] = install.editable
        finally:
            daemon.stop()
            if with_mutt and (base / "gnupg").exists():
                subprocess.run(
                    ["gpgconf", "--kill", "gpg-agent"],
                    env=gpg_env(base / "gnupg"),
                    capture_output=True,
                    check=False,
                )
    return result
