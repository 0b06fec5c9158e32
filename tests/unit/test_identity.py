from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from petalnode.errors import ConfigError
from petalnode.identity import Identity, PeerAddress, PeerId, verify_signature


def test_peer_id_round_trips_as_text() -> None:
    identity = Identity.generate()
    text = identity.peer_id.to_text()
    assert len(text) == 32 and text == text.lower()
    assert PeerId.from_text(text) == identity.peer_id
    assert identity.peer_id.matches_public_key(identity.public_key)
    assert not identity.peer_id.matches_public_key(Identity.generate().public_key)


@pytest.mark.parametrize("bad", ["", "abc", "0" * 32, "a" * 40, "not a peer id at all!!!!!!!!!!!!"])
def test_bad_peer_id_text_is_refused(bad: str) -> None:
    with pytest.raises(ConfigError):
        PeerId.from_text(bad)


def test_signatures_verify_only_for_signer_and_message() -> None:
    alice, bob = Identity.generate(), Identity.generate()
    sig = alice.sign(b"hello")
    assert verify_signature(alice.public_key, sig, b"hello")
    assert not verify_signature(bob.public_key, sig, b"hello")
    assert not verify_signature(alice.public_key, sig, b"hellp")
    assert not verify_signature(alice.public_key, sig[:-1] + bytes([sig[-1] ^ 1]), b"hello")
    assert not verify_signature(b"short", sig, b"hello")


def test_key_is_created_once_with_owner_only_permissions(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "identity.key"
    first = Identity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Identity.load_or_create(path).peer_id == first.peer_id


def test_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    Identity.load_or_create(path)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        Identity.load_or_create(path)


def test_corrupt_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    path.write_bytes(b"short")
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match="corrupt"):
        Identity.load_or_create(path)


def test_address_with_and_without_peer_id() -> None:
    peer = Identity.from_seed(b"x").peer_id
    address = PeerAddress.parse(f"tcp://127.0.0.1:31337/{peer}")
    assert (address.scheme, address.host, address.port, address.peer_id) == ("tcp", "127.0.0.1", 31337, peer)
    assert PeerAddress.parse(str(address)) == address
    bare = PeerAddress.parse("10.1.2.3:8000")
    assert bare.peer_id is None and bare.scheme == "tcp"
    v6 = PeerAddress.parse(f"tcp://[::1]:9/{peer}")
    assert v6.host == "::1" and str(v6) == f"tcp://[::1]:9/{peer}"


@pytest.mark.parametrize("bad", ["", "localhost", "host:0", "host:99999", "tcp://:80", "tcp://h:80/zzz", "a b://h:1"])
def test_bad_addresses_are_refused(bad: str) -> None:
    with pytest.raises(ConfigError):
        PeerAddress.parse(bad)
