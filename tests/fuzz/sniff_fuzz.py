"""Coverage-guided fuzzing of the ClientHello sniffer (atheris): `python -m tests.fuzz.sniff_fuzz [libFuzzer flags]`,
e.g. `-max_total_time=600`. CI runs it briefly (tests/adversarial/test_fuzz.py).

Each input is bytes a caller might send first (half of the time behind a real ClientHello's first bytes, so that the
fuzzer starts deep inside the format) and the points where the reads cut them. What must hold for every input: the
sniffer raises nothing; fed in pieces it ends with the answer `parse_client_hello` gives all of it at once; an
answer once given (not NEED_MORE) stays; with `MAX_CLIENT_HELLO` bytes the answer is never NEED_MORE.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from mtlsmesh import sniff

# The start of a TLS 1.3 ClientHello record: handshake record, ClientHello, legacy version, a random.
PREFIX = bytes.fromhex("160301") + b"\x02\x00" + b"\x01\x00\x01\xfc" + b"\x03\x03" + bytes(32)


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    body = (PREFIX if fdp.ConsumeBool() else b"") + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4096))
    sniffer = sniff.Sniffer()
    given: sniff.Sniff | None = None
    pos = 0
    while pos < len(body):
        step = fdp.ConsumeIntInRange(1, 512) if fdp.remaining_bytes() else len(body) - pos
        answer = sniffer.feed(body[pos : pos + step])
        pos += step
        if given is not None:
            assert answer == given, (answer, given)
        elif answer.state is not sniff.SniffState.NEED_MORE:
            given = answer
    whole = sniff.parse_client_hello(body)
    assert sniffer.finish() == whole, (sniffer.finish(), whole)
    if given is not None:
        assert given == whole
    padded = sniff.parse_client_hello(body + bytes(sniff.MAX_CLIENT_HELLO))
    assert padded.state is not sniff.SniffState.NEED_MORE


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
