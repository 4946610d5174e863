"""The sidecar's metrics: one prometheus_client registry per sidecar, and the text format it renders.

What it does: `SidecarMetrics` holds the per-connection metrics (counters and histograms of prometheus_client) and
the facts read at scrape time (readiness, the SVID's not-after, credential reloads: a collector that asks the
sidecar when Prometheus asks us, so a gauge cannot disagree with `/healthz/ready`). The identity-labelled series
(`mtlsmesh_tcp_*`: direction, source and destination principal, destination port, security policy) are bounded:
at most `max_label_sets` distinct label sets; a connection beyond that is counted under the same direction and
security policy with `overflow` for the principals and the port, and `mtlsmesh_metric_label_sets_overflowed_total`
counts it, so a port scan or a crowd of callers costs a bounded amount of memory. `reason` and `decision` come from
the closed sets of `outcome` (the enums themselves, not a list written here), `result` is `ok` or a `Reason`.

Multi-process (`workers`): every per-connection metric is a plain prometheus_client Counter, Histogram or Gauge (the
active gauge with `multiprocess_mode="livesum"`), so in a worker, started with `PROMETHEUS_MULTIPROC_DIR` set, their
values go to files in that directory. A worker's registry also counts its connections under its index
(`as_worker`: `mtlsmesh_worker_connections_total{worker}`, bounded by the worker count) and sets
`mtlsmesh_metric_label_sets` as a live gauge (the largest worker's, which is what the cap applies to). The
supervisor's `aggregate` registry reads that directory with prometheus_client's `MultiProcessCollector`, which adds
the counters and histograms of every worker, live or gone (a restarted worker's counts are kept), and the live
gauges of the running ones; the scrape-time collector there describes the supervisor, which holds the credentials.

What it does not: know connections or HTTP (see `runtime`, which feeds it one record per connection, and `admin`,
which serves `render`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Metric, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from mtlsmesh.outcome import Decision, Reason

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what the text format is served as
MAX_LABEL_SETS = 1000  # distinct identity label sets per sidecar; beyond it, connections count under OVERFLOW
UNKNOWN = "unknown"  # a principal not authenticated by mutual TLS (plaintext, refused, or the handshake failed)
OVERFLOW = "overflow"  # principals and port of the connections beyond MAX_LABEL_SETS
MUTUAL_TLS, NONE = "mutual_tls", "none"  # security_policy
RESULT_OK = "ok"  # a handshake that succeeded; a failed one is labelled with its Reason

IDENTITY_LABELS = ("direction", "source_principal", "destination_principal", "destination_port", "security_policy")
# Seconds. Handshakes on one host take about a millisecond; the connect and handshake timeouts are 5 s and 10 s.
HANDSHAKE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DURATION_BUCKETS = (0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

IdentityKey = tuple[str, str, str, str, str]  # the values of IDENTITY_LABELS, in that order
_M = TypeVar("_M", Counter, Gauge, Histogram)


@dataclass(frozen=True, slots=True)
class Live:
    """What the scrape-time collector asks the sidecar: readiness (the function `/healthz/ready` answers from),
    the current SVID's not-after (None before there is one), and the credential store's reload counters."""

    ready: Callable[[], bool]
    not_after: Callable[[], datetime | None]
    reloads: Callable[[], int]
    reload_failures: Callable[[], int]


class _Series:
    """The children of one identity label set, looked up once per connection instead of once per metric."""

    __slots__ = ("closed", "key", "opened", "received", "sent")

    def __init__(self, metrics: SidecarMetrics, key: IdentityKey) -> None:
        self.key = key
        self.opened = metrics.opened.labels(*key)
        self.sent = metrics.sent_bytes.labels(*key)
        self.received = metrics.received_bytes.labels(*key)
        self.closed: dict[Reason, Counter] = {}


class _LiveCollector(Collector):
    def __init__(self, metrics: SidecarMetrics) -> None:
        self.metrics = metrics

    def collect(self):  # type: ignore[no-untyped-def]  # prometheus_client's own signature is untyped
        live = self.metrics.live
        ready = GaugeMetricFamily(
            "mtlsmesh_ready", "1 when /healthz/ready answers 200 (computed by the same function, at scrape time)."
        )
        ready.add_metric([], 1.0 if live is not None and live.ready() else 0.0)
        yield ready
        not_after = live.not_after() if live is not None else None
        if not_after is not None:
            yield GaugeMetricFamily(
                "mtlsmesh_svid_not_after_timestamp_seconds",
                "When the current SVID expires, in seconds since the Unix epoch.",
                value=not_after.timestamp(),
            )
            left = max(0.0, (not_after - datetime.now(UTC)).total_seconds())
            yield GaugeMetricFamily(
                "mtlsmesh_svid_seconds_left", "Seconds until the current SVID expires (0 once it has).", value=left
            )
        if live is not None:
            yield CounterMetricFamily(
                "mtlsmesh_credential_reloads",
                "New SVIDs or bundles swapped in since start (file reloads, renewals, bundle updates).",
                value=live.reloads(),
            )
            yield CounterMetricFamily(
                "mtlsmesh_credential_reload_failures",
                "Credential reloads or renewals refused or failed; the previous credentials kept serving.",
                value=live.reload_failures(),
            )
        if self.metrics.multiprocess_dir is not None or self.metrics._label_sets is not None:
            return  # a worker's live gauge instead (`as_worker`), read from their files by the supervisor
        cap = self.metrics.max_label_sets
        sets = GaugeMetricFamily(
            "mtlsmesh_metric_label_sets", f"Identity label sets in use (at most {cap}, then overflow)."
        )
        sets.add_metric([], len(self.metrics._series))
        yield sets


class SidecarMetrics:
    """The per-sidecar registry and its metrics; see the module docstring. `live` is set by whoever serves the
    scrape (`admin.Endpoints`); until then readiness is 0 and the SVID gauges are absent."""

    def __init__(self, *, max_label_sets: int = MAX_LABEL_SETS) -> None:
        self.max_label_sets = max_label_sets
        self.registry = CollectorRegistry(auto_describe=True)
        self.live: Live | None = None
        self.multiprocess_dir: str | None = None  # set by `aggregate`
        self._worker: Counter | None = None  # this worker's connections counter (`as_worker`)
        self._label_sets: Gauge | None = None
        self._series: dict[IdentityKey, _Series] = {}
        self._children: dict[tuple[object, ...], object] = {}
        r = self.registry
        self.opened = Counter(
            "mtlsmesh_tcp_connections_opened",
            "Connections carried (upstream connected, handshakes done, the relay started), by identity.",
            IDENTITY_LABELS,
            registry=r,
        )
        self.closed = Counter(
            "mtlsmesh_tcp_connections_closed",
            "Connections ended, carried or refused, by identity and the outcome reason.",
            (*IDENTITY_LABELS, "reason"),
            registry=r,
        )
        self.received_bytes = Counter(
            "mtlsmesh_tcp_received_bytes",
            "Bytes received from the caller (the accepted side) and forwarded, added when the connection ends.",
            IDENTITY_LABELS,
            registry=r,
        )
        self.sent_bytes = Counter(
            "mtlsmesh_tcp_sent_bytes",
            "Bytes sent back to the caller (the accepted side), added when the connection ends.",
            IDENTITY_LABELS,
            registry=r,
        )
        self.overflowed = Counter(
            "mtlsmesh_metric_label_sets_overflowed",
            "Connections counted under the overflow label set because the identity label sets were all in use.",
            registry=r,
        )
        self.connections_total = Counter(
            "mtlsmesh_connections",
            "Connections ended, by direction, decision and reason (closed sets).",
            ("direction", "decision", "reason"),
            registry=r,
        )
        self.active_gauge = Gauge(
            "mtlsmesh_active_connections",
            "Connections open now, by direction.",
            ("direction",),
            registry=r,
            multiprocess_mode="livesum",
        )
        self.handshake_seconds = Histogram(
            "mtlsmesh_handshake_duration_seconds",
            "mTLS handshakes by direction and result (ok, or the failure's reason), in seconds.",
            ("direction", "result"),
            buckets=HANDSHAKE_BUCKETS,
            registry=r,
        )
        self.duration_seconds = Histogram(
            "mtlsmesh_connection_duration_seconds",
            "How long connections lasted, from accept to end, by direction and decision, in seconds.",
            ("direction", "decision"),
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self._live = _LiveCollector(self)
        self.registry.register(self._live)

    def as_worker(self, index: int) -> None:
        """This registry is a worker's (its values in the multiprocess files): count its connections under
        `index` and publish the label sets in use as a live gauge."""
        self._worker = Counter(
            "mtlsmesh_worker_connections",
            "Connections ended, by the worker process (its index, 0 to workers-1) that carried them.",
            ("worker",),
            registry=self.registry,
        ).labels(str(index))
        self.registry.unregister(self._live)  # registered again without its own label sets gauge
        self._label_sets = Gauge(
            "mtlsmesh_metric_label_sets",
            f"Identity label sets in use (at most {self.max_label_sets} per worker, then overflow); the largest's.",
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self._label_sets.set(len(self._series))
        self.registry.register(self._live)

    def aggregate(self, multiprocess_dir: str, *extra: Collector) -> None:
        """This registry is the supervisor's: it serves what the workers wrote in `multiprocess_dir`, the
        scrape-time gauges and `extra` collectors; nothing is counted here."""
        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry(auto_describe=True)
        MultiProcessCollector(self.registry, multiprocess_dir)  # type: ignore[no-untyped-call]
        self.registry.register(_LiveCollector(self))
        for collector in extra:
            self.registry.register(collector)

    def series(self, key: IdentityKey) -> _Series:
        """The children of `key`, or of its overflow label set when `max_label_sets` are in use already."""
        found = self._series.get(key)
        if found is not None:
            return found
        if len(self._series) >= self.max_label_sets:
            self.overflowed.inc()
            key = (key[0], OVERFLOW, OVERFLOW, OVERFLOW, key[4])
            found = self._series.get(key)
            if found is not None:
                return found
        # The overflow sets (one per direction and policy) may go past the cap by those few.
        found = self._series[key] = _Series(self, key)
        if self._label_sets is not None:
            self._label_sets.set(len(self._series))
        return found

    def count_opened(self, key: IdentityKey) -> None:
        self.series(key).opened.inc()

    def count_closed(
        self,
        key: IdentityKey,
        decision: Decision,
        reason: Reason,
        *,
        received: int,
        sent: int,
        seconds: float,
    ) -> None:
        series = self.series(key)
        closed = series.closed.get(reason)
        if closed is None:
            closed = series.closed[reason] = self.closed.labels(*series.key, reason)
        closed.inc()
        if received:
            series.received.inc(received)
        if sent:
            series.sent.inc(sent)
        self._child(self.connections_total, key[0], decision, reason).inc()
        if self._worker is not None:
            self._worker.inc()
        self._child(self.duration_seconds, key[0], decision).observe(seconds)

    def count_handshake(self, direction: str, seconds: float, failure: Reason | None) -> None:
        self._child(self.handshake_seconds, direction, RESULT_OK if failure is None else failure).observe(seconds)

    def count_active(self, direction: str, change: int) -> None:
        self._child(self.active_gauge, direction).inc(change)

    def _child(self, metric: _M, *values: str) -> _M:
        """`metric.labels(*values)`, remembered: label values from closed sets only (bounded by construction)."""
        key = (id(metric), *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return cast(_M, child)

    def tally(self, metric: Counter | Gauge) -> dict[tuple[str, ...], int]:
        """A metric's current values by their label values, for readers in this process (tests, the CLI's views):
        the registry is the one place the numbers live."""
        out: dict[tuple[str, ...], int] = {}
        families: Iterable[Metric] = metric.collect()
        if self.multiprocess_dir is not None:  # the supervisor: every worker's numbers, added up
            collected = MultiProcessCollector(None, self.multiprocess_dir).collect()  # type: ignore[no-untyped-call]
            families = [family for family in collected if family.name == metric._name]
        for family in families:
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                key = tuple(sample.labels.values())
                out[key] = out.get(key, 0) + int(sample.value)
        return out

    def render(self) -> bytes:
        """The text exposition format (0.0.4) of everything in the registry, as prometheus_client writes it."""
        return generate_latest(self.registry)


def identity_key(
    direction: str, decision: Decision, own: str | None, peer: str | None, destination_port: str
) -> IdentityKey:
    """The identity labels of a connection: mutual_tls once the sidecar decided on mTLS, else none; our own SPIFFE
    ID and the peer's only under mutual TLS (a plaintext peer's identity is unknown, and so, on that connection,
    is ours to it), UNKNOWN where there is none. Outbound the source is us; inbound the destination is."""
    if decision is not Decision.MTLS:
        return direction, UNKNOWN, UNKNOWN, destination_port, NONE
    ours, theirs = own or UNKNOWN, peer or UNKNOWN
    if direction == "outbound":
        return direction, ours, theirs, destination_port, MUTUAL_TLS
    return direction, theirs, ours, destination_port, MUTUAL_TLS
