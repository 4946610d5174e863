"""Coverage-guided fuzzing of the record layer (atheris): `python -m tests.fuzz.records_fuzz [libFuzzer flags]`,
e.g. `-max_total_time=600` for ten minutes, `-runs=N` for N inputs. CI runs it briefly
(tests/adversarial/test_fuzz.py).

Each input is a script: records whose inner plaintext (content, content type, padding) the fuzzer chooses, sealed
under the real keys of a session pair (so that they pass authentication and reach the parser behind it), some
raw bytes in between (headers and ciphertext that do not), and where the reader's input is cut. What must hold for
every input: `open_into` raises nothing but `RecordError` and `PeerAlert`, uses no more than it was given and
writes no more than it has room for; after an error every later call raises it again; what it delivers is exactly
the application data of the records it accepted, in order.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from mtlsmesh import records

SUITE = records.SUITES["TLS_AES_128_GCM_SHA256"]
CLIENT, SERVER = bytes(range(32)), bytes(range(32, 64))


def forge(sender: records.Session, inner: bytes) -> bytes:
    direction = sender._write
    length = len(inner) + records.TAG_SIZE
    header = bytes((records.APPLICATION_DATA, 3, 3, length >> 8, length & 0xFF))
    out = bytearray(length)
    direction.aead.encrypt_into(direction.nonce(), memoryview(inner), header, memoryview(out))
    return header + bytes(out)


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    writer = records.Session(SUITE, SERVER, CLIENT, is_client=False)
    reader = records.Session(SUITE, CLIENT, SERVER, is_client=fdp.ConsumeBool())
    wire = bytearray()
    expected = bytearray()  # application data of the well-formed data records, for when nothing fails
    clean = True
    for _ in range(fdp.ConsumeIntInRange(0, 40)):
        choice = fdp.ConsumeIntInRange(0, 3)
        if choice == 0:
            content = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300))
            wire += forge(writer, content + b"\x17" + bytes(fdp.ConsumeIntInRange(0, 20)))
            expected += content
        elif choice == 1:
            wire += forge(writer, fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64)))
            clean = False
        elif choice == 2:
            wire += fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40))
            clean = False
        else:
            writer._update_write_key(requested=fdp.ConsumeBool())
            wire += writer.take()
    pending = bytes(wire)
    delivered = bytearray()
    out = bytearray(fdp.ConsumeIntInRange(1, 1 << 15))
    error: BaseException | None = None
    for _ in range(200):
        cut = fdp.ConsumeIntInRange(0, len(pending)) if fdp.remaining_bytes() else len(pending)
        try:
            used, produced = reader.open_into(memoryview(pending)[: max(cut, 0)], memoryview(out))
        except (records.RecordError, records.PeerAlert) as exc:
            error = exc
            break
        assert 0 <= used <= cut and 0 <= produced <= len(out)
        delivered += out[:produced]
        pending = pending[used:]
        if not pending or reader.closed or (not used and cut == len(pending)):
            break
    if error is not None:
        try:
            reader.open_into(memoryview(b""), memoryview(out))
        except (records.RecordError, records.PeerAlert) as again:
            assert again is error
        else:
            raise AssertionError("a failed session read on")
    assert bytes(expected).startswith(bytes(delivered)) or not clean
    if clean and error is None and not pending:
        assert bytes(delivered) == bytes(expected)


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
