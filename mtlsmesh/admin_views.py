"""Two read-only admin endpoints for the operator's commands: `GET /explain` (`mtlsmesh explain --live`) and
`GET /status` (`mtlsmesh status`, `mtlsmesh proxy-config`).

`GET /status` answers one JSON object: ready and draining, the listeners as bound (name, address: the real port
even for a configured port 0), the SVID (`credentials.Credentials.describe`), the open connections (direction,
listener, client, original destination, peer, decision so far, age) and their count per direction, and the last
outcomes of every destination (`recent.Recent`).

`GET /explain?to=198.18.0.12:9080` (outbound) or `GET /explain?port=9080[&from=spiffe://...]` (inbound; without
`from`, a plaintext caller) answers a JSON list of one object: the decision (`explain.explain_outbound` or
`explain_inbound` over the config the sidecar runs with, no capture rules: the sidecar does not read them) and
`recent`, the last outcomes for that destination (`recent.Recent`), newest first. A bad query is a 400 with one
line saying what to write. Read-only: it changes nothing, and shows no key.

Under a supervisor of `workers`, both answer from the workers' connections (`admin.WorkersView`, gathered by
`workers.Fleet.collect`), and `/status` adds `workers: {asked, answered}`.

What it does not: route (admin.py's `Endpoints.answer` sends both paths here) or serve HTTP.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from urllib.parse import parse_qs

from mtlsmesh.addresses import host_port, split_host_port
from mtlsmesh.errors import IdentityError
from mtlsmesh.identity import parse_workload_id
from mtlsmesh.recent import Recent
from mtlsmesh.runtime import Runtime

Response = tuple[int, str, bytes]
USAGE = "use /explain?to=HOST:PORT or /explain?port=PORT[&from=SPIFFE_ID]\n"


def explain_answer(rt: Runtime, query: str, recent: Recent | None = None) -> Response:
    """`recent`: the outcomes to show (a supervisor's: its workers' merged); by default the runtime's own."""
    recent = rt.recent if recent is None else recent
    # Imported here, not with the module: `explain` (and the capture rules it reads) is in no sidecar's path until
    # someone asks, and an idle sidecar's memory is mostly the code it loaded.
    from mtlsmesh import explain

    try:
        params = {key: values[-1] for key, values in parse_qs(query, strict_parsing=bool(query)).items()}
    except ValueError:
        return 400, "text/plain", USAGE.encode()
    if "to" in params and set(params) == {"to"}:
        split = split_host_port(params["to"])
        if split is None:
            return 400, "text/plain", f"to: expected host:port (got {params['to']!r})\n".encode()
        host, port, _ = split
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return 400, "text/plain", f"to: {host!r} is not an IP address\n".encode()
        found = explain.explain_outbound(rt.config, None, ip, port).to_dict()
        found["recent"] = recent.find("outbound", orig_dst=host_port(str(ip), port))
    elif "port" in params and set(params) <= {"port", "from"}:
        text = params["port"]
        if not (text.isascii() and text.isdigit() and 0 < int(text) < 65536):
            return 400, "text/plain", f"port: expected 1-65535 (got {text!r})\n".encode()
        caller = None
        if params.get("from") not in (None, "", "plaintext"):
            try:
                caller = parse_workload_id(params["from"])
            except IdentityError as exc:
                return 400, "text/plain", f"from: {exc}\n".encode()
        found = explain.explain_inbound(rt.config, None, int(text), caller).to_dict()
        found["recent"] = recent.find("inbound", port=int(text))
    else:
        return 400, "text/plain", USAGE.encode()
    found.pop("capture", None)  # the sidecar does not read the rules; the CLI walks them
    found["notes"] = [note for note in found["notes"] if "no capture rules" not in note]
    return 200, "application/json", json.dumps([found], indent=2).encode() + b"\n"


def status_answer(
    rt: Runtime,
    ready: bool,
    draining: bool,
    bound: Mapping[str, tuple[str, int]],
    recent: Recent | None = None,
    active: Mapping[str, int] | None = None,
    workers: Mapping[str, int] | None = None,
) -> Response:
    """`recent`, `active`: a supervisor's (its workers' merged), by default the runtime's own; `workers`: how many
    workers were asked and answered, shown as such."""
    recent = rt.recent if recent is None else recent
    active = rt.stats.active if active is None else active
    body: dict[str, object] = {
        "ready": ready,
        "draining": draining,
        "listeners": [{"name": name, "address": host_port(host, port)} for name, (host, port) in bound.items()],
        "certificate": rt.credentials.current.describe(),
        "active": dict(sorted(active.items())),
        "open": recent.open_connections(),
        "recent": recent.everything(),
    }
    if workers is not None:
        body["workers"] = dict(workers)
    return 200, "application/json", json.dumps(body, indent=2).encode() + b"\n"
