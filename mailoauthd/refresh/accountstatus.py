"""
What the daemon says about its accounts: `mailoauth status` rows, the health
`mailoauth status --check` reports, and systemd's one-line STATUS=.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from mailoauthd import protocol
from mailoauthd.config import DaemonSettings
from mailoauthd.refresh.accounts import Slot, iso
from mailoauthd.refresh.alerts import warning_time
from mailoauthd.storage import state


def rows(
    slots: Mapping[str, Slot], now: datetime, next_check: datetime | None, settings: DaemonSettings
) -> list[dict[str, object]]:
    """One row per account, for `mailoauth status`."""
    out: list[dict[str, object]] = []
    for name, slot in slots.items():
        st = slot.state
        check = slot.due or next_check
        deadline = slot.deadline() if st.refresh_token else None
        out.append(
            {
                "account": name,
                "status": protocol.Status.STATE_ERROR if slot.broken else st.status,
                "flow": slot.account.flow,
                "username": slot.account.username,
                "expires_at": iso(st.expires_at) if st.access_token else None,
                "expires_in": round(st.valid_for(now)) if st.access_token else None,
                "last_refresh": iso(st.last_refresh),
                "next_check": iso(check),
                "refresh_token_issued_at": iso(st.refresh_token_issued_at),
                "refresh_token_last_used": iso(st.last_refresh) if st.refresh_token else None,
                "refresh_token_expires_at": iso(deadline),
                # Within the warning time of that cut-off: sign in again soon.
                "refresh_token_expiring": deadline is not None
                and now >= warning_time(slot.account.provider, deadline),
                "error_since": iso(st.error_since),
                "healthy": healthy(slot, now, settings),
                "failures": st.failures,
                "last_error": slot.last_error(),
                "last_error_code": st.last_error_code,
                "hint": slot.hint(),
                "scope_warning": slot.scope_warning,
            }
        )
    return out


def healthy(slot: Slot, now: datetime, settings: DaemonSettings) -> bool:
    """
    What `mailoauth status --check` reports: usable without a person's help.

    A transient failure is healthy until it has lasted `unhealthy_after`,
    and only while the last access token is valid: it bridges a short
    outage. Without one (a first refresh that failed) mail programs fail
    now. Needing authorization, a misconfiguration and an unreadable state
    file need a person at once.
    """
    if slot.broken is not None:
        return False
    st = slot.state
    if st.status == state.OK:
        return True
    if st.status == state.FAILING:
        if st.access_token is None or st.valid_for(now) <= 0:
            return False
        since = st.error_since
        return since is None or now - since < settings.unhealthy_after
    return False


def summary(slots: Mapping[str, Slot], now: datetime) -> str:
    """One line for systemd's STATUS=."""
    counts: dict[str, int] = {}
    for slot in slots.values():
        key = protocol.Status.STATE_ERROR if slot.broken else slot.state.status
        counts[key] = counts.get(key, 0) + 1
    parts = [f"{n} {k}" for k, n in sorted(counts.items())]
    line = f"{len(slots)} accounts" + (": " + ", ".join(parts) if parts else "")
    expiring = [
        (slot.state.expires_at, name)
        for name, slot in slots.items()
        if slot.state.access_token is not None and slot.state.expires_at is not None
    ]
    if expiring:
        when, name = min(expiring)
        # Whole minutes: the line changes (and is re-sent) at most once a minute.
        minutes = int((when - now).total_seconds() // 60)
        line += f"; next expiry {name} in {minutes}m" if minutes >= 0 else f"; {name} expired"
    return line
