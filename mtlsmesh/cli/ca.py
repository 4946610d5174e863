"""`mtlsmesh ca`: create a CA, issue SVIDs, inspect and verify certificates, build trust bundles.

    mtlsmesh ca init    [--trust-domain TD] [--dir certs/ca] [--key-type T] [--ttl 10y] [--intermediate]
                        [--name-constraint] [--force]
    mtlsmesh ca issue   (--spiffe-id ID | --namespace NS --service-account SA) [--ca-dir certs/ca] [--ttl 24h]
                        [--dns NAME]... [--key-type T] [--out DIR] [--csr FILE] [--force] [--k8s-secret]
    mtlsmesh ca inspect FILE [--json]
    mtlsmesh ca verify  --bundle BUNDLE [--trust-domain TD] CERT
    mtlsmesh ca bundle  (--add ROOT.pem | --remove ROOT.pem)... [--bundle FILE] [--json]
    mtlsmesh ca rotate  --to DIR [--dir certs/ca] [--json]
    mtlsmesh ca serve   --token-issuer ISSUER --token-jwks FILE_OR_HTTPS_URL [--dir certs/ca] [--ttl 24h]
                        [--listen 0.0.0.0:15012] [--token-audience mtlsmesh-ca] [--metrics-listen ADDR] [--san NAME]...
                        [--token-jwks-ca FILE] [--token-jwks-bearer FILE] [--token-jwks-refresh 5m]
                        [--publish-bundle NAMESPACE/NAME]... [--kube-api URL] [--kube-ca FILE] [--kube-token FILE]

`issue` writes cert.pem (leaf, then intermediates), key.pem (0600) and bundle.pem (roots) into --out, by default
`certs/<namespace>-<service-account>` (for an ID not of the `/ns/NS/sa/SA` form: its path segments joined by `-`).
Every output is checked before any is written, and files are renamed into place, so a refusal writes nothing.
`inspect` describes (exit 0 whenever the file can be read; a certificate whose extensions do not parse is an
error, exit 2); `verify` judges: exit 0 for a valid SVID, 1 for an invalid one (with the reason; malformed
extensions included), 2 for bad usage. A root rotation is three commands: `bundle --add` the new CA's root to the
bundle, `rotate` the directory to sign under it (the bundle keeps the old root), `bundle --remove` the old root
once nothing it signed is still valid. `serve` runs the CA service (`mtlsmesh.caserver`). Certificate work is in
`mtlsmesh.ca`, `mtlsmesh.pem` and `mtlsmesh.svid`; this module parses flags, reads files, and runs OpenSSL's chain
verification. Every subcommand but `serve` takes `--json` (a list of objects, RFC 3339 UTC times).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import logging
import re
import stat
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from OpenSSL import crypto

from mtlsmesh import ca, durations, pem, svid
from mtlsmesh.cli import output
from mtlsmesh.conventions import BUNDLE_FILE, CERT_FILE, KEY_FILE, LOG_FORMAT, SVID_SECRET_PREFIX
from mtlsmesh.errors import CertificateError, ConfigError, IdentityError, with_rules_doc
from mtlsmesh.identity import DEFAULT_TRUST_DOMAIN, SpiffeId, parse_trust_domain, parse_workload_id, workload_id

DEFAULT_CA_DIR = "certs/ca"
DEFAULT_CERTS_DIR = "certs"
EXIT_INVALID = 1

_DNS_1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # a Kubernetes namespace
_DNS_1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_MAX_SUBDOMAIN = 253  # a Kubernetes object name
_DER = serialization.Encoding.DER


def parse_ttl(text: str, flag: str = "--ttl") -> timedelta:
    """`10y`, `90d`, `24h`, `30m`, `45s`, or a sum like `1h30m` (see `durations`); at most 100 years."""
    return durations.parse_timedelta(text, flag, at_most=100 * durations.UNITS["y"])


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser], help_text: str) -> None:
    parser = subparsers.add_parser("ca", help=help_text, description="The built-in SPIFFE CA.")
    commands = parser.add_subparsers(dest="ca_command", required=True, metavar="COMMAND")
    key_types = [k.value for k in ca.KeyType]

    init = commands.add_parser(
        "init",
        help="create a root CA (and optionally an intermediate)",
        description="Create a CA directory: root.pem and root.key (and with --intermediate an intermediate that signs "
        "the leaves), bundle.pem with the root. Keys are written 0600.",
    )
    init.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN, help="default: %(default)s")
    init.add_argument("--dir", default=DEFAULT_CA_DIR, help="where the CA lives (default: %(default)s)")
    init.add_argument("--key-type", choices=key_types, default=ca.KeyType.ECDSA_P256.value, help="default: %(default)s")
    init.add_argument("--ttl", default="10y", help="root lifetime (default: %(default)s)")
    init.add_argument("--intermediate", action="store_true", help="sign leaves with an intermediate CA")
    init.add_argument("--name-constraint", action="store_true", help="constrain the CA to its trust domain's URIs")
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    output.add_json_flag(init)
    init.set_defaults(run=run_init)

    issue = commands.add_parser(
        "issue",
        help="issue a workload SVID",
        description="Issue an X.509-SVID for a SPIFFE ID (or a namespace and service account) from the CA directory: "
        "cert.pem (leaf, then intermediates), key.pem, bundle.pem in --out, or a Kubernetes Secret on stdout.",
    )
    who = issue.add_mutually_exclusive_group(required=True)
    who.add_argument("--spiffe-id", help="spiffe://<td>/<path>")
    who.add_argument("--namespace", help="with --service-account: spiffe://<td>/ns/NS/sa/SA")
    issue.add_argument("--service-account", help="with --namespace: the workload's service account")
    issue.add_argument("--ca-dir", default=DEFAULT_CA_DIR, help="default: %(default)s")
    issue.add_argument("--ttl", default="24h", help="default: %(default)s")
    issue.add_argument("--dns", action="append", default=[], metavar="NAME", help="add a DNS SAN (repeatable)")
    issue.add_argument(
        "--key-type", choices=key_types, default=ca.KeyType.ECDSA_P256.value, help="default: %(default)s"
    )
    issue.add_argument("--out", help=f"output directory (default: {DEFAULT_CERTS_DIR}/<namespace>-<sa>)")
    issue.add_argument("--csr", help="sign this PEM CSR's public key (the ID still comes from the flags)")
    issue.add_argument("--force", action="store_true", help="replace existing files")
    issue.add_argument("--k8s-secret", action="store_true", help="print a Kubernetes Secret instead of writing")
    output.add_json_flag(issue)
    issue.set_defaults(run=run_issue)

    inspect = commands.add_parser(
        "inspect",
        help="describe a certificate",
        description="Describe every certificate in a PEM file: SPIFFE ID, validity and time left, key, fingerprint, "
        "and whether it is a valid SVID (or SPIFFE signing certificate), and if not why.",
    )
    inspect.add_argument("file", help="a PEM file: one certificate or a chain")
    output.add_json_flag(inspect)
    inspect.set_defaults(run=run_inspect)

    verify = commands.add_parser(
        "verify",
        help="verify an SVID chain against a bundle: exit 0 valid, 1 invalid",
        description="Verify an SVID chain with OpenSSL against a trust bundle, then the SPIFFE rules on the leaf. "
        "Exit status 0 valid, 1 invalid (one line says why), 2 unreadable input.",
    )
    verify.add_argument("--bundle", required=True, help="the trust roots (PEM)")
    verify.add_argument("--trust-domain", help="also require the ID to be in this trust domain")
    verify.add_argument("cert", help="the SVID chain (PEM, leaf first)")
    output.add_json_flag(verify)
    verify.set_defaults(run=run_verify)

    serve = commands.add_parser(
        "serve",
        help="run the CA service: sidecars send a CSR with a service-account token or their SVID",
        description="Serve POST /v1/sign and GET /v1/bundle over TLS 1.3 (see README: The CA service).",
    )
    serve.add_argument("--dir", default=DEFAULT_CA_DIR, help="the CA directory, reloaded when it changes (%(default)s)")
    serve.add_argument("--listen", action="append", metavar="ADDR", help="host:port (default: 0.0.0.0:15012)")
    serve.add_argument("--token-issuer", required=True, metavar="ISSUER", help="the tokens' iss claim")
    serve.add_argument(
        "--token-jwks",
        required=True,
        metavar="FILE_OR_HTTPS_URL",
        help="the issuer's JWKS: a file, reloaded on change, or an https URL, fetched periodically",
    )
    serve.add_argument(
        "--token-jwks-ca",
        metavar="FILE",
        help="the CA certificates that verify the JWKS URL's server (default: the in-cluster service account's "
        "ca.crt when it exists, else the system's roots)",
    )
    serve.add_argument(
        "--token-jwks-bearer",
        metavar="FILE",
        help="send this token file's content as Authorization: Bearer to the JWKS URL (default: none)",
    )
    serve.add_argument("--token-jwks-refresh", default="5m", metavar="DURATION", help="default: %(default)s")
    serve.add_argument(
        "--publish-bundle",
        action="append",
        default=[],
        metavar="NAMESPACE/NAME",
        help="keep this ConfigMap's bundle.pem equal to the roots the CA trusts, through the Kubernetes API; repeat "
        "for each namespace whose pods mount it (off if unset)",
    )
    serve.add_argument(
        "--kube-api",
        metavar="URL",
        help="the API server (default: https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT)",
    )
    serve.add_argument("--kube-ca", metavar="FILE", help=f"the API server's CA (default: {kubeapi_sa('ca.crt')})")
    serve.add_argument("--kube-token", metavar="FILE", help=f"the bearer token (default: {kubeapi_sa('token')})")
    serve.add_argument("--token-audience", default="mtlsmesh-ca", metavar="AUD", help="default: %(default)s")
    serve.add_argument("--ttl", default="24h", help="the longest SVID lifetime it grants (default: %(default)s)")
    serve.add_argument("--metrics-listen", metavar="ADDR", help="serve GET /metrics (Prometheus) here; off if unset")
    serve.add_argument("--reload-interval", default="2s", metavar="DURATION", help="default: %(default)s")
    serve.add_argument("--refresh-hint", default="5m", metavar="DURATION", help="the bundle's spiffe_refresh_hint")
    serve.add_argument("--rate-burst", type=float, default=10.0, help="sign requests per identity at once")
    serve.add_argument("--rate", type=float, default=2.0, help="sign requests per identity per second after that")
    serve.add_argument("--san", action="append", default=[], metavar="NAME", help="DNS name or IP for its own cert")
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"), help="%(default)s")
    serve.set_defaults(run=run_serve)

    bundle = commands.add_parser(
        "bundle",
        help="build a trust bundle from several roots (rotation)",
        description="Add roots to a bundle file (or stdout) and remove others: during a root rotation the bundle "
        "holds the old and the new root.",
    )
    bundle.add_argument("--add", action="append", default=[], metavar="ROOT.pem", help="add these roots")
    bundle.add_argument("--remove", action="append", default=[], metavar="ROOT.pem", help="drop these roots")
    bundle.add_argument("--bundle", help="bundle file to extend (created if missing); default: print to stdout")
    bundle.add_argument(
        "--json",
        action="store_true",
        help="print a JSON list of objects, one per root kept, added or removed (times in RFC 3339 UTC); without "
        "--bundle each kept root carries its PEM",
    )
    bundle.set_defaults(run=run_bundle)

    rotate = commands.add_parser(
        "rotate",
        help="switch a CA directory to another CA's signer, keeping its bundle (root rotation, step 2)",
        description="Make --dir sign with the CA in --to (made by `mtlsmesh ca init --dir ...`). The bundle of --dir "
        "must already hold the new root (`mtlsmesh ca bundle --bundle DIR/bundle.pem --add TO/root.pem`); it keeps "
        "the old root too, which is also written to DIR/previous-root.pem for the last step.",
    )
    rotate.add_argument("--dir", default=DEFAULT_CA_DIR, help="the CA directory to switch (default: %(default)s)")
    rotate.add_argument("--to", required=True, metavar="DIR", help="the CA directory whose signer takes over")
    output.add_json_flag(rotate)
    rotate.set_defaults(run=run_rotate)


def kubeapi_sa(name: str) -> str:
    # The in-cluster service account's files (kubeapi.SERVICE_ACCOUNT_DIR), named without importing the service.
    return f"/var/run/secrets/kubernetes.io/serviceaccount/{name}"


def _now() -> datetime:
    return datetime.now(UTC)


def _warn_if_exposed(path: Path) -> None:
    """A private key readable by group or others works, but deserves a warning (like ssh's, without refusing)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(
            f"mtlsmesh: warning: {path} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); "
            f"run chmod 600 {path}",
            file=sys.stderr,
        )


# ---------------------------------------------------------------------------------------------------------------
# init


def run_init(args: argparse.Namespace) -> int:
    trust_domain = parse_trust_domain(args.trust_domain)
    ttl = parse_ttl(args.ttl)
    directory = Path(args.dir)
    pem.check_writable(directory, ca.CA_FILES, force=args.force)  # before spending seconds on an RSA key
    authority = ca.create_ca(
        trust_domain,
        now=_now(),
        key_type=ca.KeyType(args.key_type),
        ttl=ttl,
        intermediate=args.intermediate,
        name_constraint=args.name_constraint,
    )
    ca.save_authority(authority, directory, force=args.force)
    signer = "an intermediate" if args.intermediate else "the root"
    not_after = authority.roots[0].not_valid_after_utc
    if args.json:
        output.print_json(
            [{"trust_domain": trust_domain.name, "dir": str(directory), "key_type": args.key_type,
              "signer": "intermediate" if args.intermediate else "root", "not_after": not_after}]
        )  # fmt: skip
        return 0
    print(
        f"created CA {trust_domain.id} in {directory} ({args.key_type}, {signer} signs, valid until "
        f"{ca.format_time(not_after)})"
    )
    return 0


# ---------------------------------------------------------------------------------------------------------------
# issue


def _requested_id(args: argparse.Namespace, authority: ca.Authority) -> SpiffeId:
    if args.spiffe_id is not None:
        if args.service_account is not None:
            raise ConfigError("--service-account", "goes with --namespace, not with --spiffe-id")
        return parse_workload_id(args.spiffe_id)
    if args.service_account is None:
        raise ConfigError("--namespace", "needs --service-account too")
    return workload_id(authority.trust_domain, args.namespace, args.service_account)


def _default_out(spiffe_id: SpiffeId) -> Path:
    if spiffe_id.namespace is not None and spiffe_id.service_account is not None:
        return Path(DEFAULT_CERTS_DIR) / f"{spiffe_id.namespace}-{spiffe_id.service_account}"
    return Path(DEFAULT_CERTS_DIR) / "-".join(spiffe_id.segments)


def _k8s_secret(issued: ca.IssuedSvid, spiffe_id: SpiffeId) -> str:
    namespace, service_account = spiffe_id.namespace, spiffe_id.service_account
    if namespace is None or service_account is None:
        raise ConfigError("--k8s-secret", f"needs an ID of the form spiffe://<td>/ns/NS/sa/SA, not {spiffe_id}")
    name = SVID_SECRET_PREFIX + service_account
    if not _DNS_1123_LABEL.fullmatch(namespace):
        raise ConfigError("--k8s-secret", f"{namespace!r} is not a valid Kubernetes namespace name")
    if len(name) > _MAX_SUBDOMAIN or not _DNS_1123_SUBDOMAIN.fullmatch(name):
        raise ConfigError("--k8s-secret", f"{name!r} is not a valid Kubernetes Secret name")
    data = {
        CERT_FILE: issued.cert_chain_pem(),
        KEY_FILE: issued.key_pem(),
        BUNDLE_FILE: issued.bundle_pem(),
    }
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/name": "mtlsmesh", "app.kubernetes.io/component": "svid"},
            # Annotations, not labels: an ID or a timestamp may exceed a label value's 63 characters.
            "annotations": {
                "mtlsmesh.io/spiffe-id": str(spiffe_id),
                "mtlsmesh.io/not-after": issued.cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
            },
        },
        "type": "Opaque",
        "data": {key: base64.b64encode(value).decode() for key, value in data.items()},
    }
    return yaml.safe_dump(secret, sort_keys=False)


def run_issue(args: argparse.Namespace) -> int:
    ttl = parse_ttl(args.ttl)
    if args.k8s_secret and (args.csr or args.out):
        raise ConfigError("--k8s-secret", "prints the Secret with a new key; it goes with neither --csr nor --out")
    ca_dir = Path(args.ca_dir)
    authority = ca.load_authority(ca_dir)
    for key_file in (ca.ROOT_KEY_FILE, ca.INTERMEDIATE_KEY_FILE):
        _warn_if_exposed(ca_dir / key_file)
    spiffe_id = _requested_id(args, authority)
    dns_names = [ca.parse_dns_name(name) for name in args.dns]
    public_key = pem.load_csr_public_key(args.csr) if args.csr else None
    out = Path(args.out) if args.out else _default_out(spiffe_id)
    if not args.k8s_secret:
        names = [CERT_FILE, BUNDLE_FILE] + ([] if public_key else [KEY_FILE])
        pem.check_writable(out, names, force=args.force)
    issued = ca.issue_svid(
        authority,
        spiffe_id,
        now=_now(),
        ttl=ttl,
        dns_names=dns_names,
        key_type=ca.KeyType(args.key_type),
        public_key=public_key,
    )
    until = ca.format_time(issued.cert.not_valid_after_utc)
    if args.k8s_secret:
        sys.stdout.write(_k8s_secret(issued, spiffe_id))
        print(f"issued {spiffe_id}, valid until {until}, as a Kubernetes Secret on stdout", file=sys.stderr)
        return 0
    issued.write_to_dir(out, force=args.force)
    if args.json:
        output.print_json(
            [{"spiffe_id": str(spiffe_id), "not_after": issued.cert.not_valid_after_utc, "dir": str(out),
              "files": list(names)}]
        )  # fmt: skip
        return 0
    written = ", ".join(names)
    print(f"issued {spiffe_id}, valid until {until}, in {out} ({written})")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# inspect


def _describe(cert: x509.Certificate, source: str, now: datetime) -> dict[str, Any]:
    found = svid.extension(cert, x509.SubjectAlternativeName, source)  # CertificateError when it cannot be parsed
    san = found.value if found is not None else x509.SubjectAlternativeName([])
    uris, dns = san.get_values_for_type(x509.UniformResourceIdentifier), san.get_values_for_type(x509.DNSName)
    not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < not_before:
        time_left = f"not valid yet (starts in {ca.format_timedelta(not_before - now)})"
    elif now >= not_after:
        time_left = f"expired {ca.format_timedelta(now - not_after)} ago"
    else:
        time_left = ca.format_timedelta(not_after - now)
    reason = ""
    if svid.is_ca(cert):
        kind = "CA certificate"
        try:
            svid.ca_spiffe_id(cert)
        except CertificateError as exc:
            reason = exc.message
    else:
        kind = "leaf"
        try:
            svid.leaf_spiffe_id(cert)
        except CertificateError as exc:
            reason = exc.message
    if not reason and not not_before <= now < not_after:
        reason = "outside its validity period"
    try:
        key_type = pem.key_type_name(cert.public_key())
    except (ValueError, UnsupportedAlgorithm):
        key_type = "unknown"
    return {
        "file": source,
        "kind": kind,
        "spiffe_id": uris[0] if len(uris) == 1 else (uris or None),
        "dns_names": dns,
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": f"{cert.serial_number:x}",
        "not_before": ca.format_time(not_before),
        "not_after": ca.format_time(not_after),
        "time_left": time_left,
        "seconds_left": int((not_after - now).total_seconds()),
        "key_type": key_type,
        "sha256_fingerprint": ":".join(f"{b:02X}" for b in hashlib.sha256(cert.public_bytes(_DER)).digest()),
        "valid_svid": not reason,
        "reason": reason or None,
    }


def run_inspect(args: argparse.Namespace) -> int:
    certs = pem.load_certificates(args.file)
    now = _now()
    described = [_describe(cert, args.file, now) for cert in certs]
    if args.json:
        output.print_json(described)  # always a list, one object per certificate in the file
        return 0
    for index, info in enumerate(described):
        if index:
            print()
        label = "certificate" if len(described) == 1 else f"certificate {index + 1} of {len(described)}"
        print(f"{args.file}: {label} ({info['kind']})")
        spiffe_id = info["spiffe_id"]
        print(f"  SPIFFE ID:   {', '.join(spiffe_id) if isinstance(spiffe_id, list) else spiffe_id or '(none)'}")
        if info["dns_names"]:
            print(f"  DNS names:   {', '.join(info['dns_names'])}")
        print(f"  subject:     {info['subject'] or '(empty)'}")
        print(f"  issuer:      {info['issuer'] or '(empty)'}")
        print(f"  valid:       {info['not_before']} .. {info['not_after']} ({info['time_left']})")
        print(f"  key type:    {info['key_type']}")
        print(f"  SHA-256:     {info['sha256_fingerprint']}")
        what = "SVID" if info["kind"] == "leaf" else "SPIFFE signing certificate"
        verdict = f"yes, a valid {what}" if info["valid_svid"] else f"no: {info['reason']}"
        print(f"  SVID:        {verdict}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# verify


def verify_chain(chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate]) -> None:
    """OpenSSL's RFC 5280 path validation (strict mode, current time) of chain[0] via chain[1:] to one of roots."""
    store = crypto.X509Store()
    for root in roots:
        store.add_cert(crypto.X509.from_cryptography(root))
    store.set_flags(crypto.X509StoreFlags.X509_STRICT)
    context = crypto.X509StoreContext(
        store,
        crypto.X509.from_cryptography(chain[0]),
        [crypto.X509.from_cryptography(cert) for cert in chain[1:]],
    )
    try:
        context.verify_certificate()
    except crypto.X509StoreContextError as exc:
        depth = exc.errors[1] if len(exc.errors) > 1 else 0
        where = "" if depth == 0 else f" (at chain depth {depth})"
        raise CertificateError("", f"chain verification failed: {exc}{where}") from exc


def run_verify(args: argparse.Namespace) -> int:
    roots = pem.load_certificates(args.bundle)
    chain = pem.load_certificates(args.cert)
    trust_domain = parse_trust_domain(args.trust_domain) if args.trust_domain else None
    try:
        verify_chain(chain, roots)
        spiffe_id = svid.leaf_spiffe_id(chain[0])
        if trust_domain is not None and spiffe_id.trust_domain != trust_domain:
            raise CertificateError("", f"{spiffe_id} is not in trust domain {trust_domain} (V-7)")
    except (CertificateError, IdentityError) as exc:
        if args.json:
            output.print_json([{"file": args.cert, "valid": False, "spiffe_id": None, "not_after": None,
                                "reason": with_rules_doc(str(exc))}])  # fmt: skip
        else:
            print(f"mtlsmesh: invalid: {args.cert}: {with_rules_doc(str(exc))}", file=sys.stderr)
        return EXIT_INVALID
    if args.json:
        output.print_json([{"file": args.cert, "valid": True, "spiffe_id": str(spiffe_id),
                            "not_after": chain[0].not_valid_after_utc, "reason": None}])  # fmt: skip
        return 0
    until = ca.format_time(chain[0].not_valid_after_utc)
    print(f"{args.cert}: OK {spiffe_id} (valid until {until})")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# bundle


def run_bundle(args: argparse.Namespace) -> int:
    target = Path(args.bundle) if args.bundle else None
    try:
        existing = pem.load_certificates(target) if target is not None and target.exists() else ()
    except OSError as exc:  # exists() lets EACCES on a parent through
        raise CertificateError(str(target), f"cannot read: {exc.strerror or exc}") from exc
    if not args.add and not args.remove:
        raise ConfigError("--add", "give at least one --add or --remove")
    roots = list(existing)
    change: dict[bytes, str] = {}  # a root's SHA-256 -> "added" or "removed"; the others are kept
    gone: list[x509.Certificate] = []
    for path in args.remove:
        for cert in pem.load_certificates(path):
            if cert in roots:
                roots.remove(cert)
                gone.append(cert)
                change[cert.fingerprint(hashes.SHA256())] = "removed"
    if args.remove and not roots:
        raise ConfigError("--remove", "that would leave the bundle empty")
    for path in args.add:
        for cert in pem.load_certificates(path):
            if not svid.is_ca(cert):
                raise CertificateError(path, f"{cert.subject.rfc4514_string() or 'a leaf'} is not a CA certificate")
            if cert not in roots:
                roots.append(cert)
                change[cert.fingerprint(hashes.SHA256())] = "added"
    added = sum(1 for cert in roots if change.get(cert.fingerprint(hashes.SHA256())) == "added")
    for cert in roots:
        if cert.not_valid_after_utc <= _now():
            print(f"mtlsmesh: warning: {cert.subject.rfc4514_string()} has expired", file=sys.stderr)
    merged = pem.render_certificates(roots)
    where = str(target) if target is not None else "stdout"
    if target is not None:
        pem.write_files(target.parent, {target.name: (merged, pem.PUBLIC_MODE)}, force=True, directory_mode=0o755)
    if args.json:
        rows = [_bundle_row(cert, where, change.get(cert.fingerprint(hashes.SHA256()), "kept")) for cert in roots]
        if target is None:  # stdout is the JSON: the bundle's PEM travels in it
            for row, cert in zip(rows, roots, strict=True):
                row["pem"] = pem.render_certificates([cert]).decode()
        output.print_json(rows + [_bundle_row(cert, where, "removed") for cert in gone])
        return 0
    if target is None:
        sys.stdout.buffer.write(merged)
        sys.stdout.flush()
    dropped = f", {len(gone)} removed" if args.remove else ""
    print(f"{where}: {len(roots)} roots, {added} of them new{dropped}", file=sys.stderr)
    return 0


def _bundle_row(cert: x509.Certificate, where: str, change: str) -> dict[str, Any]:
    return {
        "bundle": where,
        "change": change,
        "subject": cert.subject.rfc4514_string(),
        "sha256": cert.fingerprint(hashes.SHA256()).hex(),
        "not_before": cert.not_valid_before_utc,
        "not_after": cert.not_valid_after_utc,
        "expired": cert.not_valid_after_utc <= _now(),
    }


# ---------------------------------------------------------------------------------------------------------------
# rotate

PREVIOUS_ROOT_FILE = "previous-root.pem"


def run_rotate(args: argparse.Namespace) -> int:
    directory, source = Path(args.dir), Path(args.to)
    old, new = ca.load_authority(directory), ca.load_authority(source)
    if new.trust_domain != old.trust_domain:
        raise ConfigError("--to", f"{source} is a CA of {new.trust_domain}, {directory} of {old.trust_domain}")
    old_root, new_root = old.roots[0], new.roots[0]
    if new_root == old_root:
        raise ConfigError("--to", f"{directory} already signs under the root of {source}")
    bundle_path = directory / BUNDLE_FILE
    if new_root not in old.roots:
        raise CertificateError(
            str(bundle_path),
            f"does not trust the new root yet; first run `mtlsmesh ca bundle --bundle {bundle_path} --add "
            f"{source / ca.ROOT_CERT_FILE}` and wait until every sidecar has the new bundle (its refresh hint)",
        )
    # The directory keeps every root it trusts (the old one included), the new root first, as load_authority
    # orders them; save_authority replaces the signer's files and removes those the new CA does not have.
    roots = (new_root, *(root for root in old.roots if root != new_root))
    switched = ca.Authority(
        signer_cert=new.signer_cert,
        signer_key=new.signer_key,
        chain=new.chain,
        roots=roots,
        trust_domain=new.trust_domain,
        root_key=new.root_key,
    )
    previous = {PREVIOUS_ROOT_FILE: (pem.render_certificates([old_root]), pem.PUBLIC_MODE)}
    pem.write_files(directory, previous, force=True)
    ca.save_authority(switched, directory, force=True)
    if args.json:
        output.print_json(
            [{"dir": str(directory), "to": str(source), "trust_domain": new.trust_domain.name,
              "signer": new.signer_cert.subject.rfc4514_string(),
              "new_root_sha256": new_root.fingerprint(hashes.SHA256()).hex(),
              "previous_root_sha256": old_root.fingerprint(hashes.SHA256()).hex(),
              "previous_root_file": str(directory / PREVIOUS_ROOT_FILE), "roots_trusted": len(roots),
              "next_step": f"mtlsmesh ca bundle --bundle {bundle_path} --remove {directory / PREVIOUS_ROOT_FILE}"}]
        )  # fmt: skip
        return 0
    print(
        f"{directory} now signs under the root of {source} ({len(roots)} roots trusted; the old one is in "
        f"{directory / PREVIOUS_ROOT_FILE}). Once every SVID it signed has expired, remove it: mtlsmesh ca bundle "
        f"--bundle {bundle_path} --remove {directory / PREVIOUS_ROOT_FILE}"
    )
    return 0


# ---------------------------------------------------------------------------------------------------------------
# serve

# The sidecar's line format (cli/sidecar.py), so that one log pipeline reads both.


def run_serve(args: argparse.Namespace) -> int:
    # Imported here: `mtlsmesh ca init` and friends need none of the service's TLS and HTTP machinery.

    import prometheus_client
    import trio

    from mtlsmesh import bundlepublish, caproto, caserver, jwtverify, kubeapi, schema
    from mtlsmesh.cli import stop_on_signals, unwrap_mesh_errors
    from mtlsmesh.config import parse_listen_addr
    from mtlsmesh.tokens import TokenPolicy

    listen = tuple(parse_listen_addr(value, "--listen") for value in args.listen or [f"0.0.0.0:{caproto.CA_PORT}"])
    metrics = parse_listen_addr(args.metrics_listen, "--metrics-listen") if args.metrics_listen else None
    for flag, value in (("--token-issuer", args.token_issuer), ("--token-audience", args.token_audience)):
        if not value.strip():
            raise ConfigError(flag, "must not be empty")
    for flag, rate in (("--rate-burst", args.rate_burst), ("--rate", args.rate)):
        if not rate > 0 or rate == float("inf"):
            raise ConfigError(flag, f"must be a positive number (got {rate})")
    if args.rate_burst < 1:
        raise ConfigError("--rate-burst", "must be at least 1 (one request)")
    jwks_ca, jwks_bearer = args.token_jwks_ca, args.token_jwks_bearer
    if jwtverify.is_url(args.token_jwks):
        jwtverify.check_jwks_source(args.token_jwks)  # plain http is refused here, before anything is read
        if jwks_ca is None:
            jwks_ca = kubeapi.default_file(kubeapi.SA_CA_FILE)
    elif jwks_ca is not None or jwks_bearer is not None:
        flag = "--token-jwks-ca" if jwks_ca is not None else "--token-jwks-bearer"
        raise ConfigError(flag, "goes with an https URL for --token-jwks, not a file")
    publish: tuple[bundlepublish.PublishConfig, ...] = ()
    if args.publish_bundle:
        targets = bundlepublish.parse_targets(args.publish_bundle, "--publish-bundle")
        api = kubeapi.HttpsUrl.parse(args.kube_api, "--kube-api") if args.kube_api else None
        kube = kubeapi.Client(
            args.kube_ca or kubeapi.default_file(kubeapi.SA_CA_FILE),
            args.kube_token or kubeapi.default_file(kubeapi.SA_TOKEN_FILE),
        )
        url = api or kubeapi.in_cluster_url("--kube-api")
        publish = tuple(bundlepublish.PublishConfig(target, url, kube) for target in targets)
    else:
        for flag, value in (
            ("--kube-api", args.kube_api),
            ("--kube-ca", args.kube_ca),
            ("--kube-token", args.kube_token),
        ):
            if value is not None:
                raise ConfigError(flag, "goes with --publish-bundle")
    cfg = caserver.ServeConfig(
        directory=args.dir,
        listen=listen,
        policy=TokenPolicy(args.token_issuer, args.token_audience),
        jwks=args.token_jwks,
        ttl=parse_ttl(args.ttl),
        metrics_listen=metrics,
        reload_interval=schema.duration(args.reload_interval, "--reload-interval", positive=True),
        refresh_hint=int(parse_ttl(args.refresh_hint, "--refresh-hint").total_seconds()),
        extra_names=tuple(args.san),
        rate_burst=args.rate_burst,
        rate_per_second=args.rate,
        jwks_ca=jwks_ca,
        jwks_token=jwks_bearer,
        jwks_refresh=schema.duration(args.token_jwks_refresh, "--token-jwks-refresh", positive=True),
        publish=publish,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger("mtlsmesh")
    root.addHandler(handler)
    root.setLevel(args.log_level.upper())
    root.propagate = False
    # The *_created series double the output and say little here. (prometheus_client leaves this one untyped.)
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    service = caserver.CaService(cfg)  # loads and checks everything before anything binds

    async def main() -> None:
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(stop_on_signals, stop, "mtlsmesh.ca")
            await nursery.start(service.serve)
            await stop.wait()
            nursery.cancel_scope.cancel()

    with unwrap_mesh_errors():
        trio.run(main)
    return 0
