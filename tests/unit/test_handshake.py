"""The TCP handshake and record layer, sans-IO: two state machines wired back to back."""

from __future__ import annotations

import pytest

from petalnode.errors import HandshakeError, LocalProtocolError, RemoteProtocolError, SwarmKeyMismatchError
from petalnode.identity import Identity
from petalnode.swarm_key import SwarmKey
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


# -- the full sans-IO handshake (`hs.Handshake`), as the TCP and relayed drivers run it ------------------------------
MAX_FRAME = 4096
KEY = SwarmKey(bytes(range(32)))


def split(record: bytes) -> tuple[bytes, bytes]:
    return record[: hs.LENGTH_PREFIX.size], record[hs.LENGTH_PREFIX.size :]


def handshake(identity: Identity, role: hs.Role, key: SwarmKey | None = None) -> hs.Handshake:
    return hs.Handshake(identity, role, max_frame=MAX_FRAME, swarm_key=key)


def exchange(initiator: hs.Handshake, responder: hs.Handshake) -> tuple[bytes, bytes]:
    """HELLOs both ways; returns (initiator's proof record, responder's proof record)."""
    return initiator.receive_hello(responder.hello()), responder.receive_hello(initiator.hello())


def first_record(attacker: hs.Handshake, peer: hs.Handshake, plaintext: bytes) -> bytes:
    """What an attacker who is the real other end of `peer`'s session can send as its first record instead of
    its own proof: any plaintext, sealed under the session's keys (it holds them)."""
    assert attacker._th is not None
    shared = attacker._ephemeral.exchange(peer._ephemeral.public)
    send_key, _ = hs.derive_keys(shared, attacker._th, attacker.role)
    return hs.RecordSealer(send_key).seal(plaintext)


def test_public_key_schedule_is_unchanged() -> None:
    # Golden vector of the version-1 key schedule (computed before private swarms existed): the public swarm's
    # wire must not move.
    send, receive = hs.derive_keys(bytes(32), bytes(range(32)), hs.Role.INITIATOR)
    assert (send + receive).hex() == PUBLIC_KEYS_HEX
    assert hs.derive_keys(bytes(32), bytes(range(32)), hs.Role.INITIATOR, psk=KEY.derive(hs.PSK_PURPOSE)) != (
        send, receive)


PUBLIC_KEYS_HEX = (
    "48d804a4845949ca6588b3f7d81fb85ecd46898d34ea655a43fc91cf16e46178"
    "91ffa2ee07d2831e11dadf97f4cd83da84d71cc6a59cd8cf2bd6603bf568cc3a"
)


@pytest.mark.parametrize("key", [None, KEY], ids=["public", "same swarm key"])
def test_full_handshake_proves_both_identities_and_records_flow(key: SwarmKey | None) -> None:
    alice, bob = Identity.from_seed(b"alice"), Identity.from_seed(b"bob")
    i, r = handshake(alice, hs.Role.INITIATOR, key), handshake(bob, hs.Role.RESPONDER, key)
    proof_i, proof_r = exchange(i, r)
    assert r.receive_proof(*split(proof_i)) == alice.peer_id
    assert i.receive_proof(*split(proof_r)) == bob.peer_id
    assert i.sealer is not None and r.opener is not None
    assert r.opener.open(*split(i.sealer.seal(b"hello bob"))) == b"hello bob"


@pytest.mark.parametrize(
    ("key_i", "key_r"), [(KEY, None), (None, KEY), (KEY, SwarmKey(bytes(32)))],
    ids=["initiator keyed", "responder keyed", "different keys"],
)
def test_without_the_same_swarm_key_neither_side_completes(key_i: SwarmKey | None, key_r: SwarmKey | None) -> None:
    alice, bob = Identity.from_seed(b"alice"), Identity.from_seed(b"bob")
    i, r = handshake(alice, hs.Role.INITIATOR, key_i), handshake(bob, hs.Role.RESPONDER, key_r)
    proof_i, proof_r = exchange(i, r)
    with pytest.raises(SwarmKeyMismatchError, match=r"swarm key|private swarm"):
        r.receive_proof(*split(proof_i))
    with pytest.raises(SwarmKeyMismatchError, match=r"swarm key|private swarm"):
        i.receive_proof(*split(proof_r))


def test_key_confirmation_a_changed_hello_breaks_the_first_record() -> None:
    # An active attacker flipping a bit of the responder's ephemeral key: the two sides derive different keys and
    # the proof (the SIGMA MAC, here the AEAD tag) does not open, so nobody proceeds on unconfirmed keys.
    alice, bob = Identity.from_seed(b"alice"), Identity.from_seed(b"bob")
    i, r = handshake(alice, hs.Role.INITIATOR), handshake(bob, hs.Role.RESPONDER)
    hello_r = bytearray(r.hello())
    hello_r[-1] ^= 0x40
    proof_i = i.receive_hello(bytes(hello_r))
    proof_r = r.receive_hello(i.hello())
    with pytest.raises(HandshakeError):
        r.receive_proof(*split(proof_i))
    with pytest.raises(HandshakeError):
        i.receive_proof(*split(proof_r))


def test_reflection_a_peer_sending_our_own_proof_back_is_refused() -> None:
    # Mallory is the real responder (she holds the session keys), opens Alice's proof and sends it back as her
    # own. TH and the key are Alice's, so only the role byte in the signed bytes tells them apart.
    alice, mallory = Identity.from_seed(b"alice"), Identity.from_seed(b"mallory")
    i, m = handshake(alice, hs.Role.INITIATOR), handshake(mallory, hs.Role.RESPONDER)
    proof_i, _ = exchange(i, m)
    assert m.opener is not None
    alices_proof = m.opener.open(*split(proof_i))
    with pytest.raises(HandshakeError, match="signature"):
        i.receive_proof(*split(first_record(m, i, alices_proof)))


def test_replay_a_proof_from_another_session_is_refused() -> None:
    # Mallory recorded Bob's proof in session 1 and is the responder of session 2 with Alice, holding its keys:
    # re-sealing the recorded proof does not help, it signs session 1's transcript.
    alice, bob, mallory = (Identity.from_seed(s) for s in (b"alice", b"bob", b"mallory"))
    i1, r1 = handshake(mallory, hs.Role.INITIATOR), handshake(bob, hs.Role.RESPONDER)
    _, proof_r1 = exchange(i1, r1)
    assert i1.opener is not None
    bobs_proof = i1.opener.open(*split(proof_r1))
    i2, m2 = handshake(alice, hs.Role.INITIATOR), handshake(mallory, hs.Role.RESPONDER)
    exchange(i2, m2)
    with pytest.raises(HandshakeError, match="signature"):
        i2.receive_proof(*split(first_record(m2, i2, bobs_proof)))
    with pytest.raises(HandshakeError):  # the recorded record itself, byte for byte
        i2.receive_proof(*split(proof_r1))


def test_no_man_in_the_middle_and_no_unknown_key_share() -> None:
    # Mallory runs one session with Alice and one with Bob. Forwarding Alice's proof to Bob fails (it signs the
    # Alice-Mallory transcript). Passing the HELLOs through untouched and substituting her own proof, signed over
    # the real transcript (TH is public), would make Bob believe he talks to Mallory while sharing keys with Alice
    # (an unknown-key share): her signature verifies, but she cannot seal it under keys she does not have.
    alice, bob, mallory = (Identity.from_seed(s) for s in (b"alice", b"bob", b"mallory"))
    i, ma = handshake(alice, hs.Role.INITIATOR), handshake(mallory, hs.Role.RESPONDER)
    mb, r = handshake(mallory, hs.Role.INITIATOR), handshake(bob, hs.Role.RESPONDER)
    proof_i, _ = exchange(i, ma)
    exchange(mb, r)
    assert ma.opener is not None
    with pytest.raises(HandshakeError, match="signature"):
        r.receive_proof(*split(first_record(mb, r, ma.opener.open(*split(proof_i)))))

    i, r = handshake(alice, hs.Role.INITIATOR), handshake(bob, hs.Role.RESPONDER)
    hello_i, hello_r = i.hello(), r.hello()
    i.receive_hello(hello_r)
    r.receive_hello(hello_i)
    th = hs.transcript_hash(hs.parse_hello(hello_i), hs.parse_hello(hello_r))
    mallorys_proof = hs.make_proof(mallory, hs.Role.INITIATOR, th)
    assert hs.verify_proof(mallorys_proof, hs.Role.INITIATOR, th) == mallory.peer_id  # the signature alone is fine
    for guess in (bytes(32), hs.derive_keys(bytes(32), th, hs.Role.INITIATOR)[0]):
        with pytest.raises(HandshakeError):
            r.receive_proof(*split(hs.RecordSealer(guess).seal(mallorys_proof)))


def test_key_compromise_impersonation_alices_stolen_key_does_not_make_bob() -> None:
    # Mallory stole Alice's identity key and answers Alice's dial to Bob, holding the session keys. A proof must
    # carry Bob's public key (the peer id Alice dialled is its hash) and a signature by it; Alice's key signs only
    # as Alice, and a proof that names Alice is refused by the driver (PeerIdMismatchError, test_tcp_transport).
    alice, bob = Identity.from_seed(b"alice"), Identity.from_seed(b"bob")
    i, m = handshake(alice, hs.Role.INITIATOR), handshake(alice, hs.Role.RESPONDER)  # m: Mallory with Alice's key
    exchange(i, m)
    assert m._th is not None
    forged = bob.public_key + alice.sign(hs.SIG_LABEL + hs.Role.RESPONDER.value + m._th + bob.public_key)
    with pytest.raises(HandshakeError, match="signature"):
        i.receive_proof(*split(first_record(m, i, forged)))


def test_handshake_refuses_out_of_order_use() -> None:
    i = handshake(Identity.from_seed(b"alice"), hs.Role.INITIATOR)
    with pytest.raises(LocalProtocolError):
        i.receive_proof(b"\x00\x00\x00\x10", bytes(16))
    i.receive_hello(hs.EphemeralKey().hello())
    with pytest.raises(LocalProtocolError):
        i.receive_hello(hs.EphemeralKey().hello())
