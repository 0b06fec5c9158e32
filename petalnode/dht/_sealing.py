# DHT datagram protection for private swarms (`--swarm-key`). Sans-IO: bytes in, bytes out.
#
# Sealed datagram: nonce (12 random bytes) | ChaCha20-Poly1305(K, nonce, rpcudp datagram, aad=AAD) (RFC 8439),
# K = SwarmKey.derive("dht datagrams"). Every datagram a keyed node sends is sealed, and every datagram it
# receives must open, so an outsider can neither read records, contacts or requests nor ask, answer, store or
# announce. What fails to open is dropped and counted (`HardenedProtocol.outsider_dropped`) before any parsing.
# Invariants:
# - A public node (no key) never calls this module: its datagrams are byte for byte what they were.
# - Nonces are random: 2^-32 collision odds only after ~2^48 datagrams under one key, far beyond a swarm's life.
# - No replay window: a captured datagram can be re-sent by an outsider. That gains it nothing it could read,
#   and what a replay can do is bounded by the records themselves (signed, with increasing seq and an expiry).
from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from petalnode.errors import CodecError
from petalnode.swarm_key import SwarmKey

PURPOSE = b"dht datagrams"
AAD = b"petalnode/dht/v1 sealed datagram"
NONCE_BYTES = 12
TAG_BYTES = 16
OVERHEAD_BYTES = NONCE_BYTES + TAG_BYTES


class DatagramSealer:
    """Seals and opens DHT datagrams under one swarm key."""

    def __init__(self, swarm_key: SwarmKey) -> None:
        self._aead = ChaCha20Poly1305(swarm_key.derive(PURPOSE))

    def seal(self, datagram: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, datagram, AAD)

    def open(self, data: bytes, max_bytes: int) -> bytes:
        """The datagram inside `data`.

        Raises:
            CodecError: too short or too long, or it does not authenticate (not sealed under our key).
        """
        if not OVERHEAD_BYTES < len(data) <= max_bytes + OVERHEAD_BYTES:
            raise CodecError(f"sealed DHT datagram of {len(data)} bytes")
        try:
            return self._aead.decrypt(bytes(data[:NONCE_BYTES]), bytes(data[NONCE_BYTES:]), AAD)
        except InvalidTag:
            raise CodecError("DHT datagram not sealed under our swarm key") from None
