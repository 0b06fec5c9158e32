# The relay fallback's end-to-end channel: mux frames over a message channel (in a swarm, an RPC stream) that a
# public peer pipes to the other side, for when no direct WebRTC path exists (symmetric NAT on both sides, or UDP
# blocked). The channel is the `RelayChannel` protocol below, so this layer never imports the RPC layer above it.
#
# The relay only moves opaque `RelayData` messages. Both ends run the TCP transport's signed X25519 handshake
# (`_handshake.py`) inside the piped stream and then exchange ChaCha20-Poly1305 records, so the relay can neither
# read nor alter the traffic, nor pose as either end (the proofs sign the transcript of the ephemeral keys).
# In a private swarm that handshake is keyed with the swarm key exactly as on TCP.
#
# Invariants:
# - One `RelayData` message is one HELLO or one sealed record (length prefix | ciphertext).
# - `write_frame` seals and queues without blocking; one writer task sends in order; `drain` waits while more than
#   HIGH_WATER_BYTES are queued, so the outer stream's flow control pushes back on the mux above.
# - Any error on the stream (relay gone, heartbeat lost, tampering) surfaces as `ConnectionClosedError`.

from __future__ import annotations

import asyncio
import collections
from typing import ClassVar, Protocol, runtime_checkable

from petalnode._lifecycle import TaskOwner
from petalnode.codecs import Message, register_message, wire_field
from petalnode.errors import (
    ClosedResourceError,
    CodecError,
    ConnectionClosedError,
    HandshakeError,
    LocalProtocolError,
    PetalnodeError,
    RemoteError,
    TransportError,
)
from petalnode.identity import Identity, PeerId
from petalnode.swarm_key import SwarmKey
from petalnode.transport import _handshake as hs

HIGH_WATER_BYTES = 1024 * 1024
# A sealed record: 4-byte length, the frame, a 16-byte tag; frames are at most 240 KiB + 6.
MAX_RECORD_BYTES = 256 * 1024


@register_message
class RelayData(Message):
    """One opaque unit of a relayed connection (a HELLO or a sealed record)."""

    KIND: ClassVar[str] = "transport.relay.data"
    VERSION: ClassVar[int] = 1
    data: bytes = wire_field(max_len=MAX_RECORD_BYTES)


@runtime_checkable
class RelayChannel(Protocol):
    """An ordered, reliable channel of codec messages that a relay pipes to the other end.

    `petalnode.rpc.RPCStream` satisfies it; the transport depends only on this contract.
    """

    async def send(self, message: Message) -> None:
        """Send one message (here always a `RelayData`)."""
        ...

    async def receive(self) -> Message:
        """The next message; raises `TransportError` (or `RemoteError`) when the channel ends or fails."""
        ...

    async def aclose(self) -> None:
        """Close the channel (idempotent)."""
        ...


class RelayedFrames:
    """Sealed mux frames over a piped `RelayChannel` (implements `FrameChannel`)."""

    def __init__(self, stream: RelayChannel, sealer: hs.RecordSealer, opener: hs.RecordOpener, max_frame: int,
                 via: str) -> None:
        self._stream = stream
        self._sealer = sealer
        self._opener = opener
        self.max_frame_bytes = max_frame
        self.via = via
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued_bytes = 0
        self._wake_writer = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._error: TransportError | None = None
        self._closed = False
        self._tasks = TaskOwner("relayed connection")
        self._tasks.spawn(self._write_loop(), name="writer")

    def write_frame(self, frame: bytes) -> None:
        if self._error is not None or self._closed:
            raise ConnectionClosedError(str(self._error or "relayed connection is closed"))
        if len(frame) > self.max_frame_bytes:
            raise LocalProtocolError(f"frame of {len(frame)} bytes exceeds max_frame_bytes={self.max_frame_bytes}")
        record = self._sealer.seal(frame)
        self._queue.append(record)
        self._queued_bytes += len(record)
        if self._queued_bytes > HIGH_WATER_BYTES:
            self._drained.clear()
        self._wake_writer.set()

    async def drain(self) -> None:
        await self._drained.wait()
        if self._error is not None:
            raise ConnectionClosedError(str(self._error))

    async def _write_loop(self) -> None:
        try:
            while True:
                while not self._queue:
                    self._wake_writer.clear()
                    await self._wake_writer.wait()
                record = self._queue.popleft()
                await self._stream.send(RelayData(data=record))
                self._queued_bytes -= len(record)
                if self._queued_bytes <= HIGH_WATER_BYTES:
                    self._drained.set()
        except (PetalnodeError, ClosedResourceError) as e:
            self._fail(ConnectionClosedError(f"relayed connection lost while sending: {e}"))

    def _fail(self, error: TransportError) -> None:
        if self._error is None:
            self._error = error
        self._drained.set()

    async def receive_frame(self) -> bytes:
        if self._error is not None:
            raise ConnectionClosedError(str(self._error))
        try:
            message = await self._stream.receive()
        except (TransportError, RemoteError, CodecError, ClosedResourceError) as e:
            self._fail(ConnectionClosedError(f"relayed connection lost: {e}"))
            raise ConnectionClosedError(f"relayed connection lost: {e}") from None
        assert isinstance(message, RelayData)
        return _open(self._opener, message.data)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._fail(ConnectionClosedError("relayed connection closed locally"))
        try:
            await self._tasks.aclose()
        finally:
            await self._stream.aclose()


def _open(opener: hs.RecordOpener, record: bytes) -> bytes:
    prefix, ciphertext = record[: hs.LENGTH_PREFIX.size], record[hs.LENGTH_PREFIX.size :]
    if len(prefix) != hs.LENGTH_PREFIX.size or opener.record_length(prefix) != len(ciphertext):
        raise ConnectionClosedError("relayed record with a wrong length prefix")
    return opener.open(prefix, ciphertext)


async def secure_relayed(
    stream: RelayChannel, identity: Identity, *, initiator: bool, max_frame: int, via: str,
    swarm_key: SwarmKey | None = None,
) -> tuple[RelayedFrames, PeerId]:
    """Run the signed handshake over a piped stream; the caller bounds it in time.

    Args:
        swarm_key: a private swarm's key, mixed into the handshake as on TCP (the relay never needs it).
    Returns:
        The frame channel and the peer id the other end proved.
    Raises:
        HandshakeError: the other end failed to prove an identity (or is not speaking our protocol);
            SwarmKeyMismatchError when it does not hold our swarm key.
        ConnectionClosedError: the relay or the other end went away.
    """
    role = hs.Role.INITIATOR if initiator else hs.Role.RESPONDER
    handshake = hs.Handshake(identity, role, max_frame=max_frame, swarm_key=swarm_key)
    try:
        await stream.send(RelayData(data=handshake.hello()))
        hello = await stream.receive()
        assert isinstance(hello, RelayData)
        proof_record = handshake.receive_hello(hello.data)
        await stream.send(RelayData(data=proof_record))
        proof = await stream.receive()
    except (TransportError, RemoteError, CodecError) as e:
        raise ConnectionClosedError(f"relayed handshake failed: {e}") from None
    assert isinstance(proof, RelayData) and handshake.sealer is not None and handshake.opener is not None
    prefix, ciphertext = proof.data[: hs.LENGTH_PREFIX.size], proof.data[hs.LENGTH_PREFIX.size :]
    if len(prefix) != hs.LENGTH_PREFIX.size:
        raise HandshakeError("relayed identity proof shorter than its length prefix")
    remote_id = handshake.receive_proof(prefix, ciphertext)
    return RelayedFrames(stream, handshake.sealer, handshake.opener, max_frame, via), remote_id
