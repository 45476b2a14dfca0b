"""
`mailoauthd` with its cyclic garbage collector watched: how often it ran and for how long.

    python -I bench/gcwatch.py --config PATH    (GCWATCH_OUT=FILE: where the JSON goes)

Collections are counted from READY=1 on (the daemon's one call of gc.freeze):
those during imports and start-up delay no answer. Only for the bench's tail
diagnosis (bench/socket_load.py): the callbacks cost a little at every
collection, so the figures of the judged runs come from the daemon as
installed, not from this.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import sys
import time

_pauses: list[tuple[int, float]] = []
_started = [0.0]
_serving = [False]
_freeze = gc.freeze


def _serving_from_now() -> None:
    """gc.freeze, which the daemon calls once, at READY=1: from then on it serves."""
    _freeze()
    _serving[0] = True


def _watch(phase: str, info: dict[str, int]) -> None:
    if not _serving[0]:
        return  # imports and start-up: not what a client waits for
    if phase == "start":
        _started[0] = time.perf_counter()
    else:
        _pauses.append((info["generation"], (time.perf_counter() - _started[0]) * 1e3))


def _write() -> None:
    longest = max(_pauses, key=lambda p: p[1], default=(0, 0.0))
    summary = {
        "collections": len(_pauses),
        "total_ms": sum(ms for _, ms in _pauses),
        "max_ms": longest[1],
        "max_generation": longest[0],
        "over_1ms": sum(ms > 1 for _, ms in _pauses),
        "by_generation": {g: sum(1 for q, _ in _pauses if q == g) for g in (0, 1, 2)},
    }
    with open(os.environ["GCWATCH_OUT"], "w") as f:
        json.dump(summary, f)


def main() -> int:
    gc.callbacks.append(_watch)
    gc.freeze = _serving_from_now
    atexit.register(_write)
    from mailoauthd.cli import main as mailoauthd

    return mailoauthd(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
