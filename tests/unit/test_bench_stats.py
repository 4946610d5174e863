"""The benchmark's arithmetic and profile bucketing: the numbers in its table must be the right ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import certs, profile, proxies, stats


@pytest.mark.parametrize(
    ("samples", "fraction", "expected"),
    [
        ([5.0], 0.5, 5.0),
        ([1.0, 2.0, 3.0, 4.0], 0.5, 2.0),
        ([4.0, 3.0, 2.0, 1.0], 0.5, 2.0),
        ([float(i) for i in range(1, 101)], 0.99, 99.0),
        ([float(i) for i in range(1, 101)], 1.0, 100.0),
        ([float(i) for i in range(1, 101)], 0.0, 1.0),
    ],
)
def test_percentile_is_nearest_rank(samples: list[float], fraction: float, expected: float) -> None:
    assert stats.percentile(samples, fraction) == expected


@pytest.mark.parametrize(
    ("samples", "fraction", "message"),
    [([], 0.5, "no samples"), ([1.0], 1.5, "outside"), ([1.0], -0.1, "outside")],
)
def test_percentile_rejects_bad_input(samples: list[float], fraction: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        stats.percentile(samples, fraction)


@pytest.mark.parametrize(
    ("target", "ratio", "value", "met"),
    [
        (stats.Target(">= 1.3x", ratio_min=1.3), 1.3, 10.0, True),
        (stats.Target(">= 1.3x", ratio_min=1.3), 1.29, 10.0, False),
        (stats.Target("<= 1.8x", ratio_max=1.8), 1.81, 10.0, False),
        (stats.Target("<= 1.8x", ratio_max=1.8), 0.5, 10.0, True),
        (stats.Target("<= 50 KiB", value_max=50.0), 9.0, 50.0, True),
        (stats.Target("<= 50 KiB", value_max=50.0), 0.1, 50.1, False),
        (stats.Target(">= 1.3x", ratio_min=1.3), None, 10.0, None),
        (stats.Target("<= 50 KiB", value_max=50.0), 1.0, None, None),
    ],
)
def test_target_met(target: stats.Target, ratio: float | None, value: float | None, met: bool | None) -> None:
    assert target.met(ratio, value) is met


def test_table_shows_medians_ratios_and_verdict_against_the_best_c_peer() -> None:
    results = {
        "stunnel": {"tput1": [100.0, 300.0, 200.0], "tput4": [100.0], "mem": [250.0], "p50": [200.0]},
        "haproxy": {"tput1": [240.0], "tput4": [90.0], "mem": [60.0], "p50": [300.0]},
        "mtlsmesh": {"tput1": [260.0, 280.0, 270.0], "tput4": [140.0], "mem": [28.0], "p50": [250.0], "pss": [90.0]},
        "mtlsmesh-1w": {"pss": [35.0, 45.0, 30.0]},
        "direct": {"tput1": [900.0], "p50": [20.0]},
    }
    table = stats.render_table(results)
    # Higher is better: the best C peer is haproxy (240 > 200), 270 / 240 = 1.125; the target is on stunnel's
    # figure, 270 / 200 = 1.35, short of 1.5.
    assert (
        "| throughput, 1 stream | Mbit/s | 200 | 240 | 270 | 900 | 1.35x | 1.12x (haproxy) | >= 1.5x stunnel | NO "
        "| 3/1/3/1 |" in table
    )
    # On the best C peer: 140 / 100 = 1.4, above 1.3.
    assert (
        "| throughput, 4 streams | Mbit/s | 100 | 90.0 | 140 | - | 1.40x | 1.40x (stunnel) | >= 1.3x | yes |" in table
    )
    # Lower is better: the best C peer is haproxy (60 < 250); the target is on the value itself.
    assert (
        "| memory per idle connection | KiB | 250 | 60.0 | 28.0 | - | 0.11x | 0.47x (haproxy) "
        "| <= 30 KiB | yes | 1/1/1/0 |" in table
    )
    # The PSS target is the one-worker pair's (median 35), whatever the default pair's figure in the row.
    assert "| PSS of both proxies, idle | MiB | - | - | 90.0 | - | - | - | <= 40 MiB, 1 worker | yes |" in table
    # Lower is better, and stunnel is the best here: 250 / 200 = 1.25, above the target.
    assert (
        "| 64 B round trip p50 | us | 200 | 300 | 250 | 20.0 | 1.25x | 1.25x (stunnel) | <= 1.0x | NO | 1/1/1/1 |"
        in table
    )
    assert "| new connections (full mTLS) | conn/s | - | - | - | - | - | - | >= 1.5x | - | 0/0/0/0 |" in table


def test_best_c_peer_ignores_mtlsmesh_and_the_no_tunnel_path() -> None:
    metric = next(m for m in stats.METRICS if m.key == "rps")
    results = {"stunnel": {"rps": [10.0]}, "haproxy": {"rps": [12.0, 14.0]}, "mtlsmesh": {"rps": [99.0]},
               "direct": {"rps": [500.0]}}  # fmt: skip
    assert stats.best_c_peer(metric, results) == ("haproxy", 13.0)
    assert stats.best_c_peer(metric, {"mtlsmesh": {"rps": [1.0]}}) is None


@pytest.mark.parametrize(
    ("noise", "cpus", "expected"),
    [
        ([0.01, 0.02, 0.03], 2, "median 2%, max 3% of one CPU, on 2 CPUs; a quiet run"),
        ([0.1, 0.6, 0.7], 2, "median 60%, max 70% of one CPU, on 2 CPUs; the machine was busy"),
        ([0.05, 0.55], 4, "median 30%, max 55% of one CPU, on 4 CPUs; a quiet run"),
        ([], 2, "noise: not measured"),
    ],
)
def test_noise_line_says_whether_the_run_was_quiet(noise: list[float], cpus: int, expected: str) -> None:
    assert expected in stats.render_noise(noise, cpus)


def test_haproxy_config_requires_and_verifies_client_certificates_without_resumption(tmp_path: Path) -> None:
    svid = certs.SvidFiles("spiffe://cluster.local/ns/bench/sa/x", tmp_path / "c", tmp_path / "k", tmp_path / "b")
    material = certs.BenchCerts(client=svid, server=svid)
    server = proxies.render_haproxy_conf(proxies.HAPROXY, material, client=False, pem=tmp_path / "s.pem")
    client = proxies.render_haproxy_conf(proxies.HAPROXY, material, client=True, pem=tmp_path / "c.pem")
    for service, port in proxies.HAPROXY.front_ports.items():
        assert (
            f"bind 198.18.9.2:{port} ssl crt {tmp_path / 's.pem'} ca-file {tmp_path / 'b'} verify required "
            "ssl-min-ver TLSv1.3 no-tls-tickets" in server
        )
        assert f"server app 127.0.0.1:{proxies.BACKEND_PORTS[service]}" in server
        assert (
            f"server peer 198.18.9.2:{port} ssl crt {tmp_path / 'c.pem'} ca-file {tmp_path / 'b'} "
            "verify required ssl-min-ver TLSv1.3 no-ssl-reuse" in client
        )
    assert "mode tcp" in server and "mode tcp" in client


@pytest.mark.parametrize(
    ("stack", "bucket"),
    [
        ("main (m.py:1);TLSStream._flush (mtlsmesh/tls.py:9);ossl_aes_gcm_encrypt_avx512 (x/_rust.abi3.so)",
         "OpenSSL C (libssl/libcrypto)"),
        ("main (m.py:1);_RNvXs_pyo3_call (cryptography/hazmat/bindings/_rust.abi3.so)",
         "cryptography Rust/pyo3 (X.509, glue)"),
        ("main (m.py:1);wrapper (trio/_socket.py:476);send (libc.so.6)", "sockets (libc, socket.py)"),
        ("main (m.py:1);relay (mtlsmesh/relay.py:3);_PyEval_EvalFrameDefault (python3.11)", "mtlsmesh code"),
        ("main (m.py:1);run (trio/_core/_run.py:2);epoll_wait (libc.so.6)", profile.IDLE_NAME),
        ("main (m.py:1);Connection.recv (OpenSSL/SSL.py:2)", "pyOpenSSL Python code"),
        ("main (m.py:1)", profile.OTHER),
    ],
)  # fmt: skip
def test_profile_bucket_is_innermost_match(stack: str, bucket: str) -> None:
    assert profile.bucket_of(stack.split(";")) == bucket


def test_profile_summarize_counts_samples() -> None:
    collapsed = "a (mtlsmesh/x.py:1) 7\na (mtlsmesh/x.py:1);send (libc.so.6) 3\nnot a sample line\n"
    assert profile.summarize(collapsed) == {"mtlsmesh code": 7, "sockets (libc, socket.py)": 3}


def test_the_openssl_record_path_is_reported_beside_ours_only_when_it_ran() -> None:
    ran = {"stunnel": {}, "mtlsmesh": {"p50": [100.0, 120.0, 110.0]}, stats.OPENSSL_TOOL: {"p50": [132.0, 132.0]}}
    table = stats.render_record_layers(ran).splitlines()
    assert "| 64 B round trip p50 | us | 110 | 132 | 1.20x | 3/2 |" in table  # medians, openssl/own, rounds
    assert "| 64 B round trip p99 | us | - | - | - | 0/0 |" in table
    assert stats.render_record_layers({"stunnel": {}, "mtlsmesh": {"p50": [1.0]}, stats.OPENSSL_TOOL: {}}) == ""


def test_classic_key_exchange_is_reported_beside_the_hybrid_default_only_when_it_ran() -> None:
    ran = {"mtlsmesh": {"cps": [700.0, 680.0, 690.0]}, stats.CLASSIC_TOOL: {"cps": [760.0, 740.0]}}
    table = stats.render_key_exchange(ran).splitlines()
    assert table[0].startswith("| metric | unit | mtlsmesh (hybrid) | mtlsmesh (classic) | classic/hybrid |")
    assert any(row.endswith("| 690 | 750 | 1.09x | 3/2 |") for row in table), table
    assert stats.render_key_exchange({"mtlsmesh": {"cps": [1.0]}, stats.CLASSIC_TOOL: {}}) == ""


def test_one_worker_is_reported_beside_the_default_only_when_it_ran() -> None:
    ran = {"mtlsmesh": {"rps": [18000.0, 17000.0, 17500.0]}, stats.ONE_WORKER_TOOL: {"rps": [9000.0, 8750.0]}}
    table = stats.render_workers(ran).splitlines()
    assert table[0].startswith("| metric | unit | mtlsmesh (default workers) | mtlsmesh (1 worker) | 1 worker/")
    assert any(row.endswith("| 17,500 | 8,875 | 0.51x | 3/2 |") for row in table), table
    assert stats.render_workers({"mtlsmesh": {"rps": [1.0]}, stats.ONE_WORKER_TOOL: {}}) == ""
