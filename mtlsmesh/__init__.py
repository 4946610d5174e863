"""mtlsmesh: zero-code mutual TLS between pods.

A tiny SPIFFE certificate authority, the iptables capture rules a pod's init step applies, and the outbound
and inbound sidecars that wrap a pod's TCP in mutual TLS. See docs/ARCHITECTURE.md for the map. Nothing of it runs
inside an app: apps are not changed and never hold a key.
"""

from __future__ import annotations

__version__ = "0.1.0"
