"""The mesh's conventions: the numbers and names its parts must agree on, each written here once.

The capture rules, the sidecar's defaults, the injector, the CA's Secret and the pod lab all meet at these values:
a port the rules redirect to must be the port the sidecar listens on, the uid the rules let through must be the
uid the injector runs the proxy as, the ALPN the client offers must be the one the inbound sniffer looks for.
Each comment says where the value comes from.

What it does not: decide anything or hold per-pod settings. Every value here is a default or a fixed name; what a
pod may change (a port, a uid) arrives as a flag or config key whose default is taken from here. Pure: it imports
nothing but `ipaddress`.
"""

from __future__ import annotations

import enum
import ipaddress

# --- ports the sidecar binds in the pod (docs/ARCHITECTURE.md §2) -----------------------------------------------------
# Istio's numbers for the same roles, so that a reader (and a NetworkPolicy) that knows one mesh knows the other.
OUTBOUND_PORT = 15001  # where the OUTPUT capture rule REDIRECTs the app's outbound TCP
INBOUND_PORT = 15006  # where the PREROUTING capture rule REDIRECTs (or TPROXYs) inbound TCP
ADMIN_PORT = 15000  # the admin endpoint, on 127.0.0.1 only
HEALTH_PORT = 15021  # /healthz/ready for the kubelet's probes
METRICS_PORT = 15090  # /stats/prometheus for scrapers
SIDECAR_PORTS = frozenset({OUTBOUND_PORT, INBOUND_PORT, ADMIN_PORT, HEALTH_PORT, METRICS_PORT})
# Health and metrics are answered by the sidecar itself: the capture rules never redirect them, in this order.
NEVER_CAPTURED_INBOUND = (HEALTH_PORT, METRICS_PORT)

# --- the proxy's identity in the pod (docs/ARCHITECTURE.md §2) --------------------------------------------------------
# The OUTPUT rules let this uid's and gid's sockets through uncaptured: that is what keeps the sidecar's own dials
# from looping back into it. Istio's istio-proxy uid; apps must not run as it.
PROXY_UID = 1337
PROXY_GID = 1337

# --- the admin port's POST token (docs/ARCHITECTURE.md §9) -----------------------------------------------------------
# The sidecar writes a fresh token here at start (mode 0600, its uid) when the directory exists; the injector mounts
# an emptyDir at the directory in the proxy container, and `mtlsmesh drain` / `log-level` read the file.
ADMIN_TOKEN_DIR = "/var/run/mtlsmesh/admin"
ADMIN_TOKEN_FILE = f"{ADMIN_TOKEN_DIR}/token"
ADMIN_TOKEN_ENV = "MTLSMESH_ADMIN_TOKEN_FILE"

# --- how inbound traffic is captured (docs/ARCHITECTURE.md §3) ---------------------------------------------------
# The init step's `--interception-mode` and the sidecar's `inbound.interception_mode` must agree.


class InterceptionMode(enum.Enum):
    REDIRECT = "REDIRECT"  # nat REDIRECT inbound; the sidecar reads SO_ORIGINAL_DST and dials the app from 127.0.0.6
    TPROXY = "TPROXY"  # mangle TPROXY inbound; the sidecar's transparent socket sees the real addresses, and its
    # dial to the app keeps the client's address as its source


# TPROXY's mark and routing table (Istio's numbers): packets carrying the mark are delivered locally by table 133.
# The mark goes on diverted inbound packets and on the sidecar's transparent dials to the app, whose replies the
# rules mark again (by their connection's mark) so that they come back to the sidecar instead of leaving the pod.
TPROXY_MARK = 1337
TPROXY_TABLE = 133

# --- what marks mesh traffic on the wire ---------------------------------------------------------------------------
# The ALPN protocol every sidecar offers and requires (docs/ARCHITECTURE.md §1); the inbound sniffer tells mesh mTLS
# from an app's own TLS by it. Our own name, registered nowhere, so no app offers it by accident.
MESH_ALPN = "mtlsmesh"

# --- the inbound sidecar's source address towards the app (docs/ARCHITECTURE.md §3, §5) -------------------------------
# The capture rules let a dial from here to the app through, so it is not redirected back to the inbound listener.
# Istio's inbound passthrough address: on lo (all of 127/8 is), yet not 127.0.0.1, which apps dial themselves.
APP_SOURCE = ipaddress.IPv4Address("127.0.0.6")
# Its IPv6 twin for an IPv6 app. IPv6 has only ::1 on lo, so the init step adds this address there.
APP_SOURCE_V6 = ipaddress.IPv6Address("::6")

# --- the SVID as files and as a Kubernetes Secret ------------------------------------------------------------------
# `mtlsmesh ca issue` writes these files (and `--k8s-secret` these Secret keys); the sidecar's credential flags and
# the injected proxy container read them. Our own names: one PEM file per role.
CERT_FILE = "cert.pem"  # the leaf, then its intermediates
KEY_FILE = "key.pem"  # the leaf's private key, PKCS#8
BUNDLE_FILE = "bundle.pem"  # the trust roots (a CA directory's are in a file of this name too)
SVID_FILES = (CERT_FILE, KEY_FILE, BUNDLE_FILE)
# One Secret per service account, `mtlsmesh-svid-<service account>`: the CA prints it, the injector mounts it.
SVID_SECRET_PREFIX = "mtlsmesh-svid-"

# --- log levels -----------------------------------------------------------------------------------------------------
# What the config's `log.level`, `--log-level` and the admin's POST /logging accept: Python's logging levels that
# the sidecar uses, in lowercase.
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")  # the sidecar's log: key=value lines, or one JSON object per line
# Every process of ours logs one key=value line per event, in this shape (the sidecar, the CA service, the webhook).
LOG_FORMAT = "ts=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"
