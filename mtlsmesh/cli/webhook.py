"""`mtlsmesh webhook`: the mutating admission webhook that injects pods as the API server creates them.

    mtlsmesh webhook --cert cert.pem --key key.pem [--bundle bundle.pem] [--listen 0.0.0.0:15017]
                     [--image IMAGE] [--trust-domain TD] [--config FILE] [--log-level LEVEL]

Serves HTTPS on --listen: `POST /inject` takes `admission.k8s.io/v1` AdmissionReviews, `GET /healthz` answers
the kubelet. The serving certificate is an SVID from `mtlsmesh ca issue` with the Service's DNS name
(`--dns mtlsmesh-webhook.mtlsmesh-system.svc`); --bundle defaults to `bundle.pem` beside --cert, which is where
`ca issue` and its `--k8s-secret` put it. The files are polled and reloaded. --image is the image the injected
containers run, as for `mtlsmesh inject --image`.

--config names a YAML file with any of these keys (a flag beats the file): `listen`, `cert`, `key`, `bundle`,
`trust_domain`, `image`, `image_pull_policy` (Always, IfNotPresent, Never), `reload_interval` (a duration),
`log_level`. Everything is checked before the port is bound; a bad input is one line and exit status 2. Logs go to
stderr, one key=value line per review; SIGTERM stops accepting and lets open requests finish.

What it does not: serve or decide (see `webhook`, `admission`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

import trio

from mtlsmesh import schema
from mtlsmesh.cli import stop_on_signals, unwrap_mesh_errors
from mtlsmesh.cli.sidecar import LineFormatter
from mtlsmesh.config import CredentialFiles, parse_listen_addr
from mtlsmesh.conventions import BUNDLE_FILE, LOG_FORMAT, LOG_LEVELS
from mtlsmesh.credentials import CredentialStore
from mtlsmesh.errors import ConfigError, MeshError
from mtlsmesh.identity import parse_trust_domain
from mtlsmesh.inject import InjectOptions
from mtlsmesh.webhook import WebhookSettings, serve_webhook

DEFAULT_LISTEN = "0.0.0.0:15017"
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
_KEYS = (
    "listen",
    "cert",
    "key",
    "bundle",
    "trust_domain",
    "image",
    "image_pull_policy",
    "reload_interval",
    "log_level",
)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the webhook needs, validated."""

    webhook: WebhookSettings
    files: CredentialFiles
    trust_domain: str
    log_level: str


def add_parser(subparsers: argparse._SubParsersAction[Any], help_text: str) -> None:
    parser = subparsers.add_parser(
        "webhook",
        help=help_text,
        description="Serve the mutating admission webhook that injects the mesh into pods as they are created.",
    )
    parser.add_argument("--listen", metavar="HOST:PORT", help=f"where to serve HTTPS (default: {DEFAULT_LISTEN})")
    parser.add_argument("--cert", metavar="FILE", help="serving certificate chain, leaf first (an SVID with a DNS SAN)")
    parser.add_argument("--key", metavar="FILE", help="its private key")
    parser.add_argument("--bundle", metavar="FILE", help="its trust bundle (default: bundle.pem beside --cert)")
    parser.add_argument("--trust-domain", metavar="TD", help="the SVID's trust domain (default: cluster.local)")
    parser.add_argument("--image", help=f"image of the injected containers (default: {InjectOptions().image})")
    parser.add_argument("--config", metavar="FILE", help="YAML file with any of the settings above")
    parser.add_argument("--log-level", metavar="LEVEL", help=f"{' | '.join(LOG_LEVELS)} (default: info)")
    parser.set_defaults(run=run)


def build_settings(args: argparse.Namespace) -> Settings:
    """Flags over the config file over the defaults; raises `ConfigError` naming the flag or the key."""
    file: dict[str, Any] = {}
    if args.config:
        loaded = schema.load_yaml(args.config)
        file = schema.mapping({} if loaded is None else loaded, args.config, _KEYS)

    def value(name: str) -> tuple[object, str] | None:
        flag = getattr(args, name, None)
        if flag is not None:
            return flag, f"--{name.replace('_', '-')}"
        if name in file:
            return file[name], f"{args.config}: {name}"
        return None

    def text(name: str) -> tuple[str, str] | None:
        found = value(name)
        return None if found is None else (schema.string(found[0], found[1]), found[1])

    listen_text = text("listen") or (DEFAULT_LISTEN, "--listen")
    listen = parse_listen_addr(listen_text[0], listen_text[1])
    cert, key = text("cert"), text("key")
    if cert is None or key is None:
        missing = "--cert" if cert is None else "--key"
        raise ConfigError(missing, "the webhook needs its serving certificate and key (--cert and --key)")
    bundle = text("bundle")
    bundle_path = bundle[0] if bundle else os.path.join(os.path.dirname(cert[0]), BUNDLE_FILE)
    interval = value("reload_interval")
    reload_interval = 2.0 if interval is None else schema.duration(interval[0], interval[1], positive=True)
    trust_domain = text("trust_domain") or ("cluster.local", "--trust-domain")
    try:
        parse_trust_domain(trust_domain[0])
    except MeshError as exc:
        raise ConfigError(trust_domain[1], str(exc)) from exc
    options = InjectOptions()
    image = text("image")
    if image is not None:
        if not image[0].strip():
            raise ConfigError(image[1], "must not be empty")
        options = dataclasses.replace(options, image=image[0].strip())
    policy = value("image_pull_policy")
    if policy is not None:
        options = dataclasses.replace(options, image_pull_policy=schema.choice(policy[0], policy[1], PULL_POLICIES))
    level = text("log_level") or ("info", "--log-level")
    if level[0].lower() not in LOG_LEVELS:
        raise ConfigError(level[1], f"expected one of {', '.join(LOG_LEVELS)}")
    return Settings(
        WebhookSettings(listen, options),
        CredentialFiles(cert[0], key[0], bundle_path, reload_interval),
        trust_domain[0],
        level[0].lower(),
    )


def run(args: argparse.Namespace) -> int:
    settings = build_settings(args)
    credentials = CredentialStore.load(settings.files, parse_trust_domain(settings.trust_domain))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LineFormatter(LOG_FORMAT))
    root = logging.getLogger("mtlsmesh")
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    root.propagate = False

    async def main() -> None:
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(stop_on_signals, stop, "mtlsmesh.webhook")
            await serve_webhook(settings.webhook, credentials, stop=stop)
            nursery.cancel_scope.cancel()

    with unwrap_mesh_errors():
        trio.run(main)
    return 0
