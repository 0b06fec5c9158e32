"""The TCP handshake and record layer, sans-IO: two state machines wired back to back."""

from __future__ import annotations

import pytest

from petalnode.errors import HandshakeError, RemoteProtocolError
from petalnode.identity import Identity
from petalnode.transport import _handshake as hs


def run_pair(initiator: Identity, responder: Identity):  # type: ignore[no-untyped-def]
    ei, er = hs.EphemeralKey(), hs.EphemeralKey()
    pub_r_seen_by_i = hs.parse_hello(er.hello())
    pub_i_seen_by_r = hs.parse_hello(ei.hello())
    th_i = hs.transcript_hash(ei.public, pub_r_seen_by_i)
    th_r = hs.transcript_hash(pub_i_seen_by_r, er.public)
    keys_i = hs.derive_keys(ei.exchange(pub_r_seen_by_i), th_i, hs.Role.INITIATOR)
    keys_r = hs.derive_keys(er.exchange(pub_i_seen_by_r), th_r, hs.Role.RESPONDER)
    return th_i, th_r, keys_i, keys_r


def test_both_sides_agree_and_prove_identities() -> None:
    alice, bob = Identity.from_seed(b"alice"), Identity.from_seed(b"bob")
    th_i, th_r, (send_i, recv_i), (send_r, recv_r) = run_pair(alice, bob)
    assert th_i == th_r
    assert send_i == recv_r and send_r == recv_i and send_i != send_r
    assert hs.verify_proof(hs.make_proof(alice, hs.Role.INITIATOR, th_i), hs.Role.INITIATOR, th_r) == alice.peer_id
    assert hs.verify_proof(hs.make_proof(bob, hs.Role.RESPONDER, th_r), hs.Role.RESPONDER, th_i) == bob.peer_id


def test_reflected_replayed_or_forged_proofs_are_refused() -> None:
    alice, mallory = Identity.from_seed(b"alice"), Identity.from_seed(b"mallory")
    th, _, _, _ = run_pair(alice, mallory)
    proof = hs.make_proof(alice, hs.Role.INITIATOR, th)
    with pytest.raises(HandshakeError):  # reflected: signed as initiator, presented as responder
        hs.verify_proof(proof, hs.Role.RESPONDER, th)
    other_th, _, _, _ = run_pair(alice, mallory)
    with pytest.raises(HandshakeError):  # replayed into another session
        hs.verify_proof(proof, hs.Role.INITIATOR, other_th)
    forged = mallory.public_key[:0] + alice.public_key + mallory.sign(b"anything")
    with pytest.raises(HandshakeError):  # alice's key with someone else's signature
        hs.verify_proof(forged, hs.Role.INITIATOR, th)
    with pytest.raises(HandshakeError):
        hs.verify_proof(proof[:-1], hs.Role.INITIATOR, th)


def test_bad_hello_and_low_order_key_are_refused() -> None:
    good = hs.EphemeralKey().hello()
    with pytest.raises(HandshakeError, match="not speaking"):
        hs.parse_hello(b"GET / HTTP/1.1\r\n" + b"x" * (hs.HELLO_BYTES - 16))
    with pytest.raises(HandshakeError, match="version"):
        hs.parse_hello(good[: len(hs.MAGIC) - 1] + b"\x09" + good[len(hs.MAGIC) :])
    with pytest.raises(HandshakeError):
        hs.parse_hello(good[:-1])
    with pytest.raises(HandshakeError):
        hs.EphemeralKey().exchange(b"\x00" * 32)  # a low-order point: all-zero shared secret


def test_records_round_trip_and_reject_tampering_replay_and_oversize() -> None:
    key = bytes(range(32))
    sealer, opener = hs.RecordSealer(key), hs.RecordOpener(key, max_plaintext_bytes=1000)
    records = [sealer.seal(b"first"), sealer.seal(b""), sealer.seal(b"third")]

    def open_record(record: bytes) -> bytes:
        prefix, body = record[:4], record[4:]
        assert opener.record_length(prefix) == len(body)
        return opener.open(prefix, body)

    assert open_record(records[0]) == b"first"
    with pytest.raises(RemoteProtocolError, match="authentication"):  # replay of record 0 as record 1
        open_record(records[0])
    assert open_record(records[1]) == b""
    tampered = bytearray(records[2])
    tampered[6] ^= 1
    with pytest.raises(RemoteProtocolError, match="authentication"):
        open_record(bytes(tampered))
    assert open_record(records[2]) == b"third"  # a failed record does not advance the counter
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        opener.record_length((1017).to_bytes(4, "big"))
    with pytest.raises(RemoteProtocolError, match="shorter"):
        opener.record_length((3).to_bytes(4, "big"))
    wrong_key = hs.RecordOpener(bytes(32), max_plaintext_bytes=1000)
    record = sealer.seal(b"x")
    with pytest.raises(RemoteProtocolError):
        wrong_key.open(record[:4], record[4:])
