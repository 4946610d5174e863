"""The demo's views: the text tables and the HTML page (`mtlsmesh.lab.report`), and the demo's readers of /proc
and of `iptables -L -v -n` that feed them."""

from __future__ import annotations

import re

import pytest

from mtlsmesh.lab import demo, report
from tests.demo_report import TD, sample


def test_table_aligns_columns_and_refuses_a_short_row() -> None:
    lines = report.table(("pod", "uid"), [("productpage", 1337), ("sleep", 1000)])
    assert lines == [
        "  pod          uid",
        "  -----------  ----",
        "  productpage  1337",
        "  sleep        1000",
    ]
    with pytest.raises(ValueError, match="1 cells for 2 columns"):
        report.table(("pod", "uid"), [("sleep",)])


def test_identity_rows_say_when_a_log_named_someone_else() -> None:
    hop = report.Hop("a", "b", "198.19.0.1:9080", "mtls", TD + "a", TD + "b", TD + "b", TD + "x", 1, 0)
    _, [row] = report.identity_rows([hop])
    assert row == ("a -> b", TD + "a", TD + "b", "yes", f"NO ({TD}x)", "1/0")


def test_the_page_is_self_contained_and_has_every_hop_and_identity() -> None:
    data = sample()
    page = report.render_html(data)
    assert page.startswith("<!DOCTYPE html>")
    # Nothing to fetch: no script, no stylesheet link, no image source, no reference outside the page.
    assert not re.search(r"<script|<link|<img|<iframe|\bsrc=|@import", page)
    assert re.findall(r"href=\"([^\"]*)\"", page) == []
    assert re.findall(r"url\(([^)]*)\)", page) == ["#arrow"] * len(data.hops)
    svg = page[page.index("<svg") : page.index("</svg>")]
    for hop in data.hops:
        assert f'data-hop="{hop.caller}-{hop.callee}"' in svg
        assert f"from {hop.source_id}" in svg and f"to {hop.destination_id}" in svg
    assert svg.count('class="pod"') == 6 and svg.count('class="sidecar"') == 5
    assert "capture path in productpage" in svg and "[6 pkts]" in svg
    assert "[0 pkts]" not in svg  # only the rules that carry the story are drawn
    assert '<span id="verdict" class="pass">PASS</span>' in page
    assert "<details><summary>iptables -t nat -L -v -n</summary>" in page
    assert "ISTIO_OUTPUT" in page


def test_everything_from_the_run_is_escaped() -> None:
    hostile = '</pre><script>alert("x")</script>'
    data = sample(evidence=hostile)
    data = report.DemoReport(
        title="<b>t</b>",
        pods=(*data.pods, report.Pod('<img src="x">', "198.18.0.99", None)),
        hops=data.hops,
        evidence=data.evidence,
        checks=(report.CheckLine("a & b", False, "<i>why</i>"),),
    )
    page = report.render_html(data)
    assert "<script" not in page and "<img" not in page and "<b>t</b>" not in page and "<i>" not in page
    assert "&lt;/pre&gt;&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "a &amp; b" in page and 'class="fail">FAIL' in page


def test_layout_puts_each_pod_in_its_call_depth_and_the_rest_below() -> None:
    data = sample()
    svg = report.render_svg(data)
    spots = dict(re.findall(r'data-pod="([^"]+)">\s*<rect x="(\d+)"', svg))
    assert int(spots["sleep"]) < int(spots["productpage"]) < int(spots["reviews"]) < int(spots["ratings"])
    assert spots["details"] == spots["reviews"] and spots["legacy"] == spots["sleep"]


def test_proc_net_tcp_reads_listening_sockets_of_both_families() -> None:
    v4 = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 00000000:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1337        0 4242 1\n"
        "   1: 0100007F:3A98 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1337        0 4243 1\n"
        "   2: 0A001290:2378 0E001290:B2A0 01 00000000:00000000 00:00000000 00000000  1000        0 4244 1\n"
    )
    assert demo.parse_proc_net_tcp(v4) == [("0.0.0.0", 15001, 1337, 4242), ("127.0.0.1", 15000, 1337, 4243)]
    v6 = (
        "  sl  local_address                         remote_address                        st ...\n"
        "   0: B80D0120000000000000000001000000:2378 00000000000000000000000000000000:0000 0A"
        " 00000000:00000000 00:00000000 00000000  1000        0 77 1\n"
    )
    assert demo.parse_proc_net_tcp(v6) == [("2001:db8::1", 9080, 1000, 77)]


LISTING = """\
Chain OUTPUT (policy ACCEPT 0 packets, 0 bytes)
 pkts bytes target     prot opt in     out     source               destination
   17  1020 MTLSMESH_OUTPUT  6    --  *      *       0.0.0.0/0            0.0.0.0/0

Chain MTLSMESH_OUTPUT (1 references)
 pkts bytes target     prot opt in     out     source               destination
    2   120 RETURN     0    --  *      lo      127.0.0.6            0.0.0.0/0
    5   300 RETURN     0    --  *      lo      0.0.0.0/0            0.0.0.0/0            ! owner UID match 1337
   1K   360 RETURN     0    --  *      *       0.0.0.0/0            0.0.0.0/0            owner UID match 1337
    0     0 RETURN     0    --  *      *       0.0.0.0/0            127.0.0.1
    4   240 MTLSMESH_REDIRECT  0    --  *      *       0.0.0.0/0            0.0.0.0/0

Chain MTLSMESH_REDIRECT (1 references)
 pkts bytes target     prot opt in     out     source               destination
    4   240 REDIRECT   6    --  *      *       0.0.0.0/0            0.0.0.0/0            redir ports 15001
"""


def test_nat_listing_is_read_with_the_rules_that_carry_the_story_called_out() -> None:
    rules = demo.parse_nat_listing(LISTING)
    assert [(r.chain, r.packets, r.target, r.match) for r in rules] == [
        ("OUTPUT", 17, "MTLSMESH_OUTPUT", ""),
        ("MTLSMESH_OUTPUT", 2, "RETURN", "out lo from 127.0.0.6"),
        ("MTLSMESH_OUTPUT", 5, "RETURN", "out lo ! owner UID match 1337"),
        ("MTLSMESH_OUTPUT", 1000, "RETURN", "owner UID match 1337"),
        ("MTLSMESH_OUTPUT", 0, "RETURN", "to 127.0.0.1"),
        ("MTLSMESH_OUTPUT", 4, "MTLSMESH_REDIRECT", ""),
        ("MTLSMESH_REDIRECT", 4, "REDIRECT", "redir ports 15001"),
    ]
    noted = [r.note for r in rules]
    assert "ISTIO_OUTPUT" in noted[0]
    assert "127.0.0.6" in noted[1] and noted[2] == "" and "uid 1337" in noted[3] and noted[4] == ""
    assert "15001" in noted[6]


def test_the_first_answer_reads_as_one_row_per_service() -> None:
    body = (
        b'{"service": "productpage", "peer": "127.0.0.6", "marker": "m", "upstreams": {'
        b'"reviews": {"status": 200, "body": {"service": "reviews", "peer": "127.0.0.6", "marker": "m",'
        b' "upstreams": {"ratings": {"status": 503, "body": {"service": "ratings", "peer": "127.0.0.6",'
        b' "marker": "", "upstreams": {}}}}}}}}'
    )
    assert demo._answer_rows(body) == [
        ("productpage", "sleep", "200", "127.0.0.6", "yes"),
        ("reviews", "productpage", "200", "127.0.0.6", "yes"),
        ("ratings", "reviews", "503", "127.0.0.6", "no"),
    ]
    assert demo._answer_rows(b"not json") == [("?", "sleep", "?", "(not JSON)", "-")]
