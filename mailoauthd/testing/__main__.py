"""
`python -m mailoauthd.testing`: the development provider as a process, until SIGTERM or SIGINT.

Prints one JSON line with its URL and endpoints once it listens; scripts and
the end-to-end suite then drive it through its /admin/... JSON routes.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

from mailoauthd.testing.provider import DevProvider
from mailoauthd.testing.state import ROTATIONS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mailoauthd.testing",
        description="Run the development OAuth2 provider until SIGTERM or SIGINT.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--access-token-lifetime", type=float, default=3600.0, metavar="S")
    parser.add_argument("--rotation", choices=ROTATIONS, default="rotate")
    parser.add_argument("--access-token-length", type=int, default=48, metavar="N")
    parser.add_argument(
        "--reuse-interval",
        type=float,
        default=0.0,
        metavar="S",
        help="with --rotation strict: how long a retired refresh token still works",
    )
    args = parser.parse_args(argv)
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    # Blocked before any thread exists, so every thread inherits the mask and
    # sigwait() below is the one place the signals arrive.
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        provider = DevProvider(
            host=args.host,
            port=args.port,
            access_token_lifetime=args.access_token_lifetime,
            refresh_token_rotation=args.rotation,
            access_token_length=args.access_token_length,
            refresh_token_reuse_interval=args.reuse_interval,
        )
        provider.start()
    except (OSError, ValueError) as exc:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        print(f"devprovider: {exc}", file=sys.stderr)
        return 1
    try:
        print(json.dumps({"url": provider.url, **provider.endpoints}), flush=True)
        signal.sigwait(stop_signals)
    finally:
        provider.stop()
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    return 0


if __name__ == "__main__":
    sys.exit(main())
