"""The warning that our SVID is getting old: one log line per SVID when less than a configured share of its
lifetime is left (`log.svid_warning`, 0.2 by default), whether it came from files or from the CA service.

What it does: `watch_svid_life` looks at the credential source's current SVID once a `POLL` and logs
`event=svid_expiring` the first time its life left falls below the share, naming the SVID (SPIFFE ID, SHA-256),
its not-after, the time and share left. A renewed or reloaded SVID is a new one: it gets its own warning when its
time comes. In identity mode renewal normally happens at `renew_fraction` (half the life), long before, so the line
means renewal has been failing. `life_left(not_before, not_after, now)` is the share, pure.

What it does not: renew anything, or change readiness (the health endpoint turns 503 only once the SVID expired).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import trio

from mtlsmesh import durations
from mtlsmesh.credentials import CredentialSource

log = logging.getLogger("mtlsmesh.credentials")

POLL = 1.0  # seconds between looks at the current SVID (a comparison of two times: nothing to save)


def life_left(not_before: datetime, not_after: datetime, now: datetime) -> float:
    """The share of the lifetime still ahead, 0.0 (expired) to 1.0 (not yet begun)."""
    total = (not_after - not_before).total_seconds()
    if total <= 0:
        return 0.0
    return min(1.0, max(0.0, (not_after - now).total_seconds() / total))


async def watch_svid_life(source: CredentialSource, share: float, *, poll: float = POLL) -> None:
    """Forever: warn once per SVID (by fingerprint) when less than `share` of its life is left."""
    warned = ""
    while True:
        current = source.current
        if current.fingerprint != warned:
            now = datetime.now(UTC)
            not_before = current.material.chain[0].not_valid_before_utc
            left = life_left(not_before, current.not_after, now)
            if left < share:
                warned = current.fingerprint
                log.warning(
                    "event=svid_expiring spiffe_id=%s sha256=%s not_after=%s time_left=%s life_left=%.2f below=%.2f",
                    current.spiffe_id,
                    current.fingerprint,
                    durations.format_time(current.not_after),
                    durations.format_duration(max(0.0, (current.not_after - now).total_seconds())),
                    left,
                    share,
                )
        await trio.sleep(poll)
