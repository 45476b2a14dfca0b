"""
Where things live by default, for the daemon and the helper alike. Standard library only.

Per-user mode (not root) follows the XDG base directories; system mode (root,
or `--system`) uses the paths systemd's StateDirectory=/RuntimeDirectory=
create. Every function takes the environment as an argument so that nothing
here reads the process environment at import time.
"""

import os.path

# Paths are plain strings here: pathlib costs the helper a measurable share of
# its start-up, and the helper only needs to join and compare.
# The environment, as a plain dict (`dict(os.environ)`): naming an abstract
# Mapping type would cost the helper an import of `typing`.
Env = dict[str, str]

SYSTEM_CONFIG = "/etc/mailoauthd/config.toml"
SYSTEM_STATE_DIR = "/var/lib/mailoauthd"
SYSTEM_SOCKET = "/run/mailoauthd/socket"


def _home(env: Env) -> str:
    return env.get("HOME") or os.path.expanduser("~")


def _xdg(env: Env, var: str, fallback: str) -> str:
    value = env.get(var, "")
    # The XDG spec says relative values are invalid and must be ignored.
    if value and os.path.isabs(value):
        return value
    return os.path.join(_home(env), fallback)


def config_path(env: Env, *, system: bool) -> str:
    """The config file used when no --config is given."""
    if system:
        return SYSTEM_CONFIG
    if env.get("MAILOAUTHD_CONFIG"):
        return env["MAILOAUTHD_CONFIG"]
    return os.path.join(_xdg(env, "XDG_CONFIG_HOME", ".config"), "mailoauthd", "config.toml")


def state_dir(env: Env, *, system: bool) -> str:
    """The token store used when the config names no state_dir."""
    if system:
        # systemd sets STATE_DIRECTORY for StateDirectory=; honour a relocation.
        directory = env.get("STATE_DIRECTORY", "").split(":")[0]
        return directory or SYSTEM_STATE_DIR
    return os.path.join(_xdg(env, "XDG_STATE_HOME", ".local/state"), "mailoauthd")


def user_socket(env: Env, uid: int) -> str:
    """The per-user socket: $XDG_RUNTIME_DIR/mailoauthd/socket."""
    runtime = env.get("XDG_RUNTIME_DIR", "")
    base = runtime if runtime and os.path.isabs(runtime) else f"/run/user/{uid}"
    return os.path.join(base, "mailoauthd", "socket")


def daemon_socket(env: Env, uid: int, *, system: bool) -> str:
    """Where the daemon listens when the config names no socket."""
    if env.get("MAILOAUTHD_SOCKET"):
        return env["MAILOAUTHD_SOCKET"]
    if system:
        return SYSTEM_SOCKET
    return user_socket(env, uid)


def helper_sockets(env: Env, uid: int) -> list[str]:
    """
    The sockets the helper tries, in order.

    Args:
        env: the environment.
        uid: the helper's uid.
    """
    if env.get("MAILOAUTHD_SOCKET"):
        return [env["MAILOAUTHD_SOCKET"]]
    user = user_socket(env, uid)
    return [user, SYSTEM_SOCKET] if user != SYSTEM_SOCKET else [user]
