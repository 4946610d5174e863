"""What the operator's commands (`explain`, `check`, `status`, `proxy-config`) share: where they run and what they
read there.

- `--pod NAME`: run the same command again inside a pod of the lab (`mtlsmesh demo --keep`, or a test's lab), by
  its network namespace: the one named NAME, or the one lab namespace whose name ends in `-NAME`
  (`ip netns exec NS mtlsmesh ...`). It needs root, as the lab does. In Kubernetes the command runs in the pod
  (`kubectl exec POD -c mtlsmesh-proxy -- mtlsmesh check`) and needs no `--pod`.
- `--admin HOST:PORT`: the sidecar's admin endpoint (default 127.0.0.1:15000), read with plain HTTP GETs
  (`admin_get`); `explain`, `check`, `status` and `proxy-config` change nothing in the sidecar.
- `--token-file FILE` and `admin_post`: the two commands that do (`drain`, `log-level`) POST with the sidecar's
  per-process token (`Authorization: Bearer`), read from the file it wrote (`read_token`: the flag, else
  `$MTLSMESH_ADMIN_TOKEN_FILE`, else /var/run/mtlsmesh/admin/token), which only its uid (1337) and root can read.
- `read_rules(family)` and `read_rules_file(path)`: the capture rules as `iptables-save` prints them.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mtlsmesh.capture import Family
from mtlsmesh.capture_plan import SavedTable, parse_save
from mtlsmesh.config import ListenAddr, parse_listen_addr
from mtlsmesh.conventions import ADMIN_PORT, ADMIN_TOKEN_ENV, ADMIN_TOKEN_FILE, PROXY_UID
from mtlsmesh.errors import ConfigError, MeshError

NETNS_DIR = Path("/run/netns")
DEFAULT_ADMIN = f"127.0.0.1:{ADMIN_PORT}"
HTTP_TIMEOUT = 5.0
POD_TIMEOUT = 120.0


class AdminError(MeshError):
    """The admin endpoint did not answer, or not with what was asked."""


def add_pod_flags(parser: argparse.ArgumentParser, *, admin: bool = True) -> None:
    parser.add_argument(
        "--pod", metavar="NAME", help="run inside this lab pod's network namespace (root; see `mtlsmesh demo --keep`)"
    )
    if admin:
        parser.add_argument(
            "--admin", metavar="HOST:PORT", default=DEFAULT_ADMIN, help="the sidecar's admin endpoint (%(default)s)"
        )


def find_namespace(pod: str) -> str:
    """The network namespace of `pod`: named so, or the only one named `<lab prefix>-<pod>`."""
    names = sorted(path.name for path in NETNS_DIR.iterdir()) if NETNS_DIR.is_dir() else []
    if pod in names:
        return pod
    found = [name for name in names if name.endswith(f"-{pod}")]
    if len(found) == 1:
        return found[0]
    if not found:
        raise ConfigError("--pod", f"no network namespace for pod {pod!r} (is a lab running? `ip netns list`)")
    raise ConfigError("--pod", f"{pod!r} is in several labs ({', '.join(found)}): give the namespace's full name")


def run_in_pod(pod: str, argv: Sequence[str]) -> int:
    """Run `mtlsmesh ARGV` (without `--pod`) in the pod's namespace; its output is ours, its status is ours."""
    namespace = find_namespace(pod)
    if os.geteuid() != 0:
        raise ConfigError("--pod", "entering a pod's network namespace needs root")
    command = ["ip", "netns", "exec", namespace, sys.executable, "-m", "mtlsmesh", *without_pod(argv)]
    try:
        return subprocess.run(command, timeout=POD_TIMEOUT, check=False).returncode
    except FileNotFoundError:
        raise ConfigError("--pod", "ip not found on PATH: install the iproute2 package") from None
    except subprocess.TimeoutExpired:
        raise ConfigError("--pod", f"no answer from pod {pod} within {POD_TIMEOUT:.0f}s") from None


def without_pod(argv: Sequence[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word == "--pod":
            skip = True
        elif not word.startswith("--pod="):
            out.append(word)
    return out


def admin_address(text: str) -> ListenAddr:
    return parse_listen_addr(text, "--admin")


def admin_get(address: ListenAddr, path: str) -> tuple[int, bytes]:
    """GET `path` from the admin endpoint: (status, body); AdminError when it does not answer."""
    connection = http.client.HTTPConnection(address.host, address.port, timeout=HTTP_TIMEOUT)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        raise AdminError(f"the sidecar's admin endpoint {address} did not answer GET {path}: {detail}") from None
    finally:
        connection.close()


def admin_json(address: ListenAddr, path: str) -> Any:
    status, body = admin_get(address, path)
    if status != 200:
        raise AdminError(f"GET {path} on {address}: {status} {body.decode(errors='replace').strip()}")
    try:
        return json.loads(body)
    except ValueError:
        raise AdminError(f"GET {path} on {address}: not JSON") from None


def read_rules(family: Family) -> dict[str, SavedTable]:
    """This namespace's rules (root: `iptables-save` needs CAP_NET_ADMIN)."""
    from mtlsmesh import installer

    return dict(installer.read_state(installer.detect_backend(), family))


def read_rules_file(path: str) -> dict[str, SavedTable]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError("--rules", f"{path}: {exc.strerror or exc}") from None
    tables = parse_save(text)
    if not tables:
        raise ConfigError("--rules", f"{path}: no nat or mangle table in it (expected iptables-save output)")
    return tables


def add_token_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        help=f"the admin token the sidecar wrote (default ${ADMIN_TOKEN_ENV}, else {ADMIN_TOKEN_FILE})",
    )


def token_path(flag: str | None) -> str:
    return flag or os.environ.get(ADMIN_TOKEN_ENV) or ADMIN_TOKEN_FILE


def read_token(path: str) -> str:
    """The sidecar's admin token from `path`; AdminError saying what to do when it cannot be read."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise AdminError(
            f"no admin token file {path}: the sidecar writes it at start (--admin-token-file or "
            f"{ADMIN_TOKEN_ENV}; by default when {os.path.dirname(ADMIN_TOKEN_FILE)} exists); give it with --token-file"
        ) from None
    except PermissionError:
        raise AdminError(
            f"cannot read the admin token {path}: permission denied (run as uid {PROXY_UID} or root)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise AdminError(f"cannot read the admin token {path}: {reason}") from None
    if not token:
        raise AdminError(f"the admin token file {path} is empty")
    return token


def admin_post(address: ListenAddr, path: str, token: str, token_file: str) -> bytes:
    """POST `path` with the token: the answer's body on 200; AdminError explaining a refusal or no answer."""
    connection = http.client.HTTPConnection(address.host, address.port, timeout=HTTP_TIMEOUT)
    try:
        connection.request("POST", path, headers={"Authorization": f"Bearer {token}", "Content-Length": "0"})
        response = connection.getresponse()
        status, body = response.status, response.read()
    except (OSError, http.client.HTTPException) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        raise AdminError(f"the sidecar's admin endpoint {address} did not answer POST {path}: {detail}") from None
    finally:
        connection.close()
    text = body.decode(errors="replace").strip()
    if status == 200:
        return body
    if status == 401:
        raise AdminError(f"POST {path} on {address}: 401, the sidecar wants the admin token ({text})")
    if status == 403 and "no admin token" in text:
        raise AdminError(
            f"POST {path} on {address}: 403, the sidecar has no admin token (it was started without a token file: "
            f"--admin-token-file or {ADMIN_TOKEN_ENV})"
        )
    if status == 403 and "wrong admin token" in text:
        raise AdminError(
            f"POST {path} on {address}: 403, the sidecar refused the token in {token_file} (a file of another or an "
            "earlier sidecar process? check --admin and --token-file)"
        )
    raise AdminError(f"POST {path} on {address}: {status} {text}")
