"""The open connections, and the last outcomes per destination, kept in memory so that `mtlsmesh explain --live`
can show what really happened to connections like the one it explains, and `mtlsmesh status` what is open now.

What it does: `Recent.opened(rec)` notes a connection as open; `Recent.closed(rec)` (or `add`, for one never
opened) files it, finished, under (direction, original destination); `find` answers the last ones there, newest
first, `everything` all of them, `open_connections` those still open. The outcomes are bounded twice, so a scan of
many addresses costs a fixed amount of memory: at most `destinations` keys (the least recently used goes first)
and `per_destination` outcomes each; the open ones are as many as the connection limit lets be open.
With `workers`, each worker keeps its own: `snapshot` is what one sends its supervisor, and `merge` makes of
them one `Recent` to answer from (newest outcomes kept, the same bounds).

What it does not: count (the metrics do), log, or keep anything across restarts. Pure: no I/O.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Protocol

from mtlsmesh import durations
from mtlsmesh.identity import SpiffeId

DESTINATIONS = 256
PER_DESTINATION = 8


class Finished(Protocol):
    """What `add` reads of a connection's record (`runtime.ConnRecord` has it all)."""

    direction: str
    listener: str
    started: float  # time.monotonic() at accept
    orig_dst: str
    client_addr: str
    peer_id: SpiffeId | None
    detail: str
    bytes_in: int
    bytes_out: int

    @property
    def decision(self) -> object: ...

    @property
    def reason(self) -> object: ...


# (wall time, client, peer_id, decision, reason, detail, bytes_in, bytes_out): one tuple per connection
_Entry = tuple[float, str, str | None, str, str, str, int, int]
# What `Recent.snapshot` gives: the outcomes per (direction, orig_dst), least recently used first, and the open
# connections as `open_connections` lists them. Plain tuples, lists and dicts: it crosses a process boundary.
Snapshot = tuple[list[tuple[tuple[str, str], list[_Entry]]], list[dict[str, object]]]


class Recent:
    def __init__(self, destinations: int = DESTINATIONS, per_destination: int = PER_DESTINATION) -> None:
        self.destinations = destinations
        self.per_destination = per_destination
        self._by_key: OrderedDict[tuple[str, str], deque[_Entry]] = OrderedDict()
        self._open: dict[int, Finished] = {}
        self._open_elsewhere: list[dict[str, object]] = []  # `merge`: other processes' open connections

    def snapshot(self) -> Snapshot:
        return [(key, list(entries)) for key, entries in self._by_key.items()], self.open_connections()

    @classmethod
    def merge(
        cls, snapshots: list[Snapshot], destinations: int = DESTINATIONS, per_destination: int = PER_DESTINATION
    ) -> Recent:
        """One `Recent` of several processes' `snapshot`s: per destination the newest `per_destination` outcomes
        of all, the `destinations` most recently used destinations, every open connection."""
        merged = cls(destinations, per_destination)
        by_key: dict[tuple[str, str], list[_Entry]] = {}
        for outcomes, open_rows in snapshots:
            for key, entries in outcomes:
                by_key.setdefault(key, []).extend(entries)
            merged._open_elsewhere.extend(open_rows)
        newest_last = sorted(by_key.items(), key=lambda item: max((entry[0] for entry in item[1]), default=0.0))
        for key, entries in newest_last[-destinations:] if destinations > 0 else []:
            entries.sort(key=lambda entry: entry[0])
            merged._by_key[key] = deque(entries[-per_destination:], maxlen=per_destination)
        return merged

    def opened(self, rec: Finished) -> None:
        self._open[id(rec)] = rec

    def closed(self, rec: Finished) -> None:
        self._open.pop(id(rec), None)
        self.add(rec)

    def open_connections(self) -> list[dict[str, object]]:
        now = time.monotonic()
        rows: list[dict[str, object]] = [
            {
                "direction": rec.direction, "listener": rec.listener, "client": rec.client_addr,
                "orig_dst": rec.orig_dst, "peer_id": None if rec.peer_id is None else str(rec.peer_id),
                "decision": str(rec.decision), "age_seconds": round(now - rec.started, 3),
            }
            for rec in self._open.values()
        ]  # fmt: skip
        return rows + self._open_elsewhere

    def everything(self) -> list[dict[str, object]]:
        """Every destination's last outcomes: {direction, orig_dst, and the fields of `find`}, newest first."""
        out: list[dict[str, object]] = []
        for (direction, dst), entries in reversed(self._by_key.items()):
            out.extend({"direction": direction, "orig_dst": dst, **row} for row in self._rows(list(entries)))
        return out

    def add(self, rec: Finished) -> None:
        key = (rec.direction, rec.orig_dst)
        entries = self._by_key.get(key)
        if entries is None:
            if len(self._by_key) >= self.destinations:
                self._by_key.popitem(last=False)
            entries = self._by_key[key] = deque(maxlen=self.per_destination)
        else:
            self._by_key.move_to_end(key)
        peer = None if rec.peer_id is None else str(rec.peer_id)
        entries.append(
            (time.time(), rec.client_addr, peer, str(rec.decision), str(rec.reason), rec.detail, rec.bytes_in,
             rec.bytes_out)
        )  # fmt: skip

    def find(self, direction: str, *, orig_dst: str | None = None, port: int | None = None) -> list[dict[str, object]]:
        """The last outcomes, newest first, to `orig_dst` (`host:port`), or to any address on `port`."""
        found: list[_Entry] = []
        for (kind, dst), entries in self._by_key.items():
            if kind != direction:
                continue
            if orig_dst is not None and dst != orig_dst:
                continue
            if port is not None and not dst.endswith(f":{port}"):
                continue
            found.extend(entries)
        found.sort(key=lambda entry: entry[0], reverse=True)
        return self._rows(found[: self.per_destination])

    @staticmethod
    def _rows(found: list[_Entry]) -> list[dict[str, object]]:
        found = sorted(found, key=lambda entry: entry[0], reverse=True)
        return [
            {
                "time": durations.format_timestamp(at), "client": client, "peer_id": peer, "decision": decision,
                "reason": reason, "detail": detail, "bytes_in": bytes_in, "bytes_out": bytes_out,
            }
            for at, client, peer, decision, reason, detail, bytes_in, bytes_out in found
        ]  # fmt: skip
