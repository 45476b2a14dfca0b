"""
Limits that keep one local user from drowning the others: a rate limit on log lines per uid.

Refused requests are logged, and a user who loops on a refused request would
otherwise fill the journal (and push out everyone else's lines). Each uid may
log BURST lines at once (enough for a person trying things out) and then one
every INTERVAL seconds; the lines left out are counted, and the next line
logged for that uid says how many.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

BURST = 20
INTERVAL = 3.0
# Uids remembered at once: a bound on memory whatever the number of local users.
MAX_TRACKED = 4096


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float
    dropped: int = 0


class LogLimit:
    """A token bucket per uid: `allow` says whether this line may be logged now."""

    def __init__(
        self, *, burst: int = BURST, interval: float = INTERVAL, tracked: int = MAX_TRACKED
    ) -> None:
        self.burst = burst
        self.interval = interval
        self.tracked = tracked
        self._buckets: OrderedDict[int, _Bucket] = OrderedDict()

    def allow(self, uid: int, now: float) -> bool:
        """Take a token for `uid` at time `now` (seconds, any monotonic clock)."""
        bucket = self._buckets.pop(uid, None)
        if bucket is None:
            bucket = _Bucket(tokens=float(self.burst), at=now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.at) / self.interval)
        bucket.at = now
        self._buckets[uid] = bucket  # most recently used last
        while len(self._buckets) > self.tracked:
            self._buckets.popitem(last=False)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True
        bucket.dropped += 1
        return False

    def suppressed(self, uid: int) -> dict[str, int]:
        """{"suppressed": N} for the lines left out since the last one logged, and reset."""
        bucket = self._buckets.get(uid)
        if bucket is None or not bucket.dropped:
            return {}
        dropped, bucket.dropped = bucket.dropped, 0
        return {"suppressed": dropped}
