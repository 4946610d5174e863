"""How a connection ended: the sidecar's decision, the reason it ended, a detail for the log, the peer's identity.

What it does: defines `Decision` and `Reason`, the closed sets the metric labels and the log line's `decision=` and
`reason=` fields are drawn from (so the labels' cardinality is bounded by construction); `Failure`, a step's typed
answer when it did not succeed (a reason and its detail); and `Outcome`, the four fields every connection's record
carries (`runtime.ConnRecord` is one: one object per connection, no second one to allocate). Both handlers fill an
outcome at the same points, by one rule:

- `decision` is set exactly once, when the sidecar knows how it will carry the connection: outbound once the route
  is decided (for an explicit originate listener, at once), inbound once the sniff or the port's mode has said
  whether it is mesh mTLS. It is then `mtls` or `passthrough` and stays so whatever happens next. A connection that
  ends before that point keeps `refuse`: the sidecar refused it (no original destination, a loop, REGISTRY_ONLY,
  not mesh TLS on a STRICT port, the connection limit), or it ended before anything was decided (the caller reset
  or went quiet while being sniffed, a drain, a bug).
- `reason` is set when the connection ends. After the decision it says what became of it within that decision: a
  failed handshake is `mtls handshake_failed` in both directions, a policy denial after mTLS is `mtls denied`, a
  plaintext caller denied is `passthrough denied`, an upstream that does not answer is `... connect_timeout`.
- `detail` is free text for the log line only (the handshake's error, the rule that denied, the errno's text):
  never a label, never parsed.
- `peer_id` is the peer's SPIFFE ID once the handshake has checked it, else None.

Why the decision comes first and the reason last: the same failure then carries the same labels whichever way the
connection went, and `decision` alone still says how many connections were carried as mTLS, passed through, or not
carried at all.

What it does not: log, count or close anything (see `runtime` and `steps`). Pure: no I/O imports.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from mtlsmesh.identity import SpiffeId


# StrEnum: a member is the text it stands for, so the log line and the metric labels format it, and the counters
# hash it, at the speed of a str (once per connection).
class Decision(enum.StrEnum):
    """How the sidecar carries a connection."""

    MTLS = "mtls"  # wrapped in (outbound) or unwrapped from (inbound) mesh mTLS
    PASSTHROUGH = "passthrough"  # relayed as plain TCP, untouched (outside the mesh, PERMISSIVE, DISABLE)
    REFUSE = "refuse"  # not carried: refused or ended before the decision


class Reason(enum.StrEnum):
    """Why a connection ended; the set is closed (a metric label). Who produces each is in its comment."""

    # The relay ended (`relay`).
    CLOSED = "closed"  # both directions ended cleanly (FIN / close_notify)
    IDLE_TIMEOUT = "idle_timeout"  # nothing moved either way for `timeouts.idle`
    RESET_BY_APP = "reset_by_app"  # the local app's side failed (an RST)
    # The remote side failed: the other sidecar (an RST, a truncated stream, a fatal alert it sent) or, passed
    # through, the remote caller or destination; inbound, also while the caller was being sniffed.
    RESET_BY_PEER = "reset_by_peer"
    # The remote side broke the TLS record protocol after the handshake (`relay`, from the stream's alert): each is
    # named after the fatal alert we sent it, so tampering and broken peers are told apart from plain resets.
    BAD_RECORD_MAC = "bad_record_mac"  # a record failed authentication: forged, corrupted, replayed or reordered
    UNEXPECTED_MESSAGE = "unexpected_message"  # a record or message not allowed there (a wrong type, CCS, a
    # handshake message but KeyUpdate, a malformed alert, more than 32 records in a row without application data)
    RECORD_OVERFLOW = "record_overflow"  # a record over the size limits (RFC 8446 §5.2, §5.4)
    DECODE_ERROR = "decode_error"  # a record or message that does not parse (too short, a KeyUpdate's length)
    ILLEGAL_PARAMETER = "illegal_parameter"  # a well-formed message with a value not allowed (a KeyUpdate's flag)
    # Before the decision (`outbound`, `inbound`, `runtime`).
    NO_ORIG_DST = "no_orig_dst"  # the kernel has no original destination: not a redirected connection
    LOOP = "loop"  # dialing on would come back to this listener
    REGISTRY_ONLY = "registry_only"  # outbound, outside the mesh under REGISTRY_ONLY
    NOT_MESH = "not_mesh"  # inbound STRICT: plaintext, another protocol, or TLS without the mesh's ALPN
    SNIFF_TIMEOUT = "sniff_timeout"  # inbound STRICT: no complete ClientHello within `inbound.sniff_timeout`
    CLOSED_DURING_SNIFF = "closed_during_sniff"  # inbound STRICT: EOF before a complete ClientHello
    CLIENT_HELLO_TOO_LARGE = "client_hello_too_large"  # inbound STRICT: no ClientHello in sniff.MAX_CLIENT_HELLO
    LIMIT = "limit"  # `max_connections` open already
    # After the decision (`steps`, `inbound`).
    HANDSHAKE_FAILED = "handshake_failed"  # the mTLS handshake or the peer's SVID checks failed
    HANDSHAKE_TIMEOUT = "handshake_timeout"  # the handshake took longer than `timeouts.handshake`
    DENIED = "denied"  # inbound: the authorization policy, or an explicit listener's identities, refused the caller
    CONNECT_FAILED = "connect_failed"  # the upstream refused or was unreachable
    CONNECT_TIMEOUT = "connect_timeout"  # the upstream did not answer within `timeouts.connect`
    # Whenever (`runtime`).
    DRAIN_TIMEOUT = "drain_timeout"  # still open when the drain after SIGTERM ran out
    CANCELLED = "cancelled"  # cancelled otherwise (the sidecar stopping)
    ERROR = "error"  # a MeshError (bad input) escaped the handler
    INTERNAL_ERROR = "internal_error"  # a bug: any other exception (its traceback is logged), or no reason set


@dataclass(frozen=True, slots=True)
class Failure:
    """What a step answers instead of its result when it failed: the reason to end the connection with, and the
    detail for its log line."""

    reason: Reason
    detail: str = ""


@dataclass(slots=True, kw_only=True)
class Outcome:
    """How one connection ended, filled in as it goes (see the module docstring for when each field is set). Not
    frozen: it is the connection's own record, one per connection, written by its handler alone."""

    decision: Decision = Decision.REFUSE  # until the handler decides
    reason: Reason = Reason.INTERNAL_ERROR  # until it ends: a handler that returns without a reason is a bug
    detail: str = ""
    peer_id: SpiffeId | None = None
