"""The WebRTC transport on one host: RPC through a relay node, identity checks, big messages, dead peers, timeouts.

aioice skips loopback host candidates, so these connections use this machine's own interface address; the
packets still never leave the host (the kernel routes a host's own addresses locally).
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from aioice import stun

from petalnode.errors import (
    ConnectionClosedError,
    ConnectTimeoutError,
    HandshakeError,
    PeerIdMismatchError,
    UnknownSessionError,
)
from petalnode.identity import Identity, PeerAddress
from petalnode.node import Node
from petalnode.node._signaling import NatOptions, Signaling
from petalnode.node._signaling_messages import WebRTCInfo, WebRTCInfoRequest
from petalnode.rpc import RPC
from petalnode.swarm_key import SwarmKey
from petalnode.transport import ConnectionConfig, SignedDescription, StunServer, WebRTCTransport
from petalnode.transport import _webrtc_signing as signing

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
KEY, OTHER_KEY = SwarmKey(bytes(range(32))), SwarmKey(bytes(32))


class DirectSignaler:
    """Hands offers straight to the target transport (or to a stand-in), in process."""

    def __init__(self) -> None:
        self.peers: dict = {}

    async def ice_servers(self, address: PeerAddress) -> list[str]:
        return []

    async def exchange(self, address: PeerAddress, offer: SignedDescription) -> SignedDescription:
        return await self.peers[address.peer_id](offer)


async def _pair(config: ConnectionConfig | None = None):
    """(dialler transport, listener transport, accepted-connection queue, address of the listener)."""
    signaler = DirectSignaler()
    a = WebRTCTransport(Identity.generate(), signaler=signaler, config=config)
    b = WebRTCTransport(Identity.generate(), config=config)
    accepted: asyncio.Queue = asyncio.Queue()

    async def handler(connection) -> None:
        await accepted.put(connection)

    await b.listen(handler)
    signaler.peers[b.local_peer_id] = b.accept_offer
    return a, b, accepted, PeerAddress("webrtc", "127.0.0.1", 9, b.local_peer_id), signaler


async def test_rpc_between_nodes_through_a_relay_node() -> None:
    relay = Node(nat=NatOptions(mode="public"))
    await relay.start()
    behind = Node(bootstrap=[relay.address], nat=NatOptions(mode="nat"))
    client = Signaling(Identity.generate())
    transport = client.transport()
    rpc = RPC(transport)
    try:
        await behind.start()
        assert behind.address.scheme == "webrtc"
        assert (behind.address.host, behind.address.port) == (relay.address.host, relay.address.port)
        assert behind.address.peer_id == behind.identity.peer_id
        started = time.perf_counter()
        reply = await rpc.call(behind.address, "webrtc_info", WebRTCInfoRequest(), expected=WebRTCInfo)
        setup_s = time.perf_counter() - started
        assert isinstance(reply, WebRTCInfo) and reply.stun_port > 0
        assert setup_s < 5.0
        paths = client.webrtc.connection_paths()
        assert list(paths) == [behind.identity.peer_id]
        assert "relay" not in paths[behind.identity.peer_id]  # a direct (host) pair on one machine
        for _ in range(20):  # the pooled WebRTC connection keeps serving
            await rpc.call(behind.address, "webrtc_info", WebRTCInfoRequest(), expected=WebRTCInfo)
    finally:
        await rpc.aclose()
        await transport.aclose()
        await behind.aclose()
        await relay.aclose()


async def test_unregistered_target_is_a_clear_error() -> None:
    relay = Node(nat=NatOptions(mode="public"))
    await relay.start()
    client = Signaling(Identity.generate())
    transport = client.transport()
    try:
        nobody = PeerAddress("webrtc", relay.address.host, relay.address.port, Identity.generate().peer_id)
        with pytest.raises(UnknownSessionError, match="not registered"):
            await transport.dial(nobody, connect_timeout_s=5.0)
    finally:
        await transport.aclose()
        await relay.aclose()


async def test_auto_mode_announces_tcp_when_the_dial_back_succeeds() -> None:
    relay = Node(nat=NatOptions(mode="public"))
    await relay.start()
    node = Node(bootstrap=[relay.address], nat=NatOptions())
    try:
        await node.start()
        assert node.address.scheme == "tcp"
    finally:
        await node.aclose()
        await relay.aclose()


async def test_peer_presenting_another_identity_is_refused() -> None:
    a, b, _, address, signaler = await _pair()
    impostor = Identity.generate()

    async def impostor_answers(offer: SignedDescription) -> SignedDescription:
        # A relay (or anyone on the path) answering with its own valid key instead of the dialled peer's.
        return signing.sign(impostor, kind=signing.ANSWER, sdp=offer.sdp, receiver=offer.sender, nonce=offer.nonce)

    signaler.peers[b.local_peer_id] = impostor_answers
    try:
        with pytest.raises(PeerIdMismatchError):
            await a.dial(address, connect_timeout_s=5.0)
        assert not a._connections and not a._pending
    finally:
        await a.aclose()
        await b.aclose()


async def test_four_mib_message_arrives_intact() -> None:
    a, b, accepted, address, _ = await _pair()
    try:
        connection = await a.dial(address, connect_timeout_s=5.0)
        far = await asyncio.wait_for(accepted.get(), 5.0)
        data = bytes(range(256)) * (16 * 1024)  # 4 MiB, above WebRTC's 256 KiB message limit
        stream = await connection.open_stream()
        far_stream = await asyncio.wait_for(far.accept_stream(), 5.0)
        sent = asyncio.create_task(stream.send(data))
        got = await asyncio.wait_for(far_stream.receive(), 30.0)
        await sent
        assert got == data
        await far_stream.send(b"ok")
        assert await asyncio.wait_for(stream.receive(), 5.0) == b"ok"
    finally:
        await a.aclose()
        await b.aclose()


async def test_dead_peer_is_noticed_within_the_heartbeat_bound() -> None:
    config = ConnectionConfig(keepalive_interval_s=0.5, keepalive_timeout_s=2.0)
    a, b, accepted, address, _ = await _pair(config)
    try:
        connection = await a.dial(address, connect_timeout_s=5.0)
        far = await asyncio.wait_for(accepted.get(), 5.0)
        stream = await connection.open_stream()
        # The far host vanishes without a word (power loss): its ICE sockets close, nothing is sent.
        ice = far._channel.pc.sctp.transport.transport._connection
        for protocol in ice._protocols:
            protocol.transport.close()
        started = time.perf_counter()
        with pytest.raises(ConnectionClosedError):
            await asyncio.wait_for(stream.receive(), 10.0)
        noticed_s = time.perf_counter() - started
        assert connection.closed
        assert noticed_s < config.keepalive_timeout_s + 2 * config.keepalive_interval_s + 0.5, noticed_s
    finally:
        await a.aclose()
        await b.aclose()


async def test_connect_timeout_is_bounded_when_the_far_side_never_answers() -> None:
    a, b, _, address, signaler = await _pair()

    async def never(offer: SignedDescription) -> SignedDescription:
        await asyncio.sleep(3600)
        raise AssertionError

    async def answer_then_vanish(offer: SignedDescription) -> SignedDescription:
        answer = await b.accept_offer(offer)
        for pc in list(b._pending):  # the answerer dies before ICE completes
            ice = pc.sctp.transport.transport._connection
            for protocol in ice._protocols:
                protocol.transport.close()
        return answer

    try:
        for answerer in (never, answer_then_vanish):
            signaler.peers[b.local_peer_id] = answerer
            started = time.perf_counter()
            with pytest.raises(ConnectTimeoutError):
                await a.dial(address, connect_timeout_s=1.5)
            assert time.perf_counter() - started < 3.5
            assert not a._connections
    finally:
        await a.aclose()
        await b.aclose()


async def test_stun_server_answers_binding_requests() -> None:
    async with StunServer("127.0.0.1") as server:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            sock.settimeout(2.0)
            request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
            sock.sendto(b"not stun at all", ("127.0.0.1", server.port))  # ignored
            sock.sendto(bytes(request), ("127.0.0.1", server.port))
            data = await asyncio.to_thread(sock.recv, 2048)
            response = stun.parse_message(data)
            assert response.message_class == stun.Class.RESPONSE
            assert response.transaction_id == request.transaction_id
            assert response.attributes["XOR-MAPPED-ADDRESS"] == sock.getsockname()
            assert len(data) <= len(bytes(request)) + 20
            assert server.answered == 1


async def test_relay_carries_rpc_when_no_direct_path_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    relay = Node(nat=NatOptions(mode="public"))
    await relay.start()
    behind = Node(bootstrap=[relay.address], nat=NatOptions(mode="nat"))
    client = Signaling(Identity.generate())
    transport = client.transport()
    rpc = RPC(transport)

    async def no_direct_path(address: PeerAddress, timeout_s: float):
        await asyncio.sleep(timeout_s)  # what a symmetric NAT on both sides looks like: ICE never completes
        raise ConnectTimeoutError("no direct path")

    monkeypatch.setattr(client.webrtc, "_dial_direct", no_direct_path)
    always_relay = Signaling(Identity.generate())
    always_relay.webrtc.direct = False
    relay_only = always_relay.transport()
    try:
        await behind.start()
        started = time.perf_counter()
        reply = await rpc.call(behind.address, "webrtc_info", WebRTCInfoRequest(), expected=WebRTCInfo)
        assert isinstance(reply, WebRTCInfo)
        assert time.perf_counter() - started < rpc.connect_timeout_s + 1.0
        paths = client.webrtc.connection_paths()
        assert paths == {behind.identity.peer_id: f"relayed via {relay.address.host}:{relay.address.port}"}
        assert relay._signaling.relay_server.relayed_bytes > 0
        for _ in range(10):  # the relayed connection is pooled and keeps serving
            await rpc.call(behind.address, "webrtc_info", WebRTCInfoRequest(), expected=WebRTCInfo)
        started = time.perf_counter()
        connection = await relay_only.dial(behind.address, connect_timeout_s=5.0)  # direct=False: no ICE wait
        assert time.perf_counter() - started < 2.0
        assert always_relay.webrtc.connection_paths()[behind.identity.peer_id].startswith("relayed via")
        await connection.aclose()
    finally:
        await relay_only.aclose()
        await rpc.aclose()
        await transport.aclose()
        await behind.aclose()
        await relay.aclose()


async def test_node_behind_nat_registers_again_when_its_relay_connection_drops() -> None:
    relay = Node(nat=NatOptions(mode="public"))
    await relay.start()
    behind = Node(bootstrap=[relay.address], nat=NatOptions(mode="nat"))
    client = Signaling(Identity.generate())
    transport = client.transport()
    rpc = RPC(transport)
    try:
        await behind.start()
        registered = relay._signaling.relay_server._registered
        old = registered[behind.identity.peer_id]
        await old.aclose()  # the relay restarts its side, say
        for _ in range(100):  # at most 5 s
            if registered.get(behind.identity.peer_id) not in (None, old):
                break
            await asyncio.sleep(0.05)
        assert registered.get(behind.identity.peer_id) not in (None, old)
        reply = await rpc.call(behind.address, "webrtc_info", WebRTCInfoRequest(), expected=WebRTCInfo)
        assert isinstance(reply, WebRTCInfo)
    finally:
        await rpc.aclose()
        await transport.aclose()
        await behind.aclose()
        await relay.aclose()


@pytest.mark.parametrize(("dialler_key", "listener_key"), [(KEY, None), (None, KEY), (KEY, OTHER_KEY)],
                         ids=["dialler keyed", "listener keyed", "different keys"])
async def test_private_swarm_webrtc_only_between_holders_of_one_key(dialler_key, listener_key) -> None:
    signaler = DirectSignaler()
    a = WebRTCTransport(Identity.generate(), signaler=signaler, swarm_key=dialler_key)
    b = WebRTCTransport(Identity.generate(), swarm_key=listener_key)
    c = WebRTCTransport(Identity.generate(), signaler=signaler, swarm_key=listener_key)
    accepted: asyncio.Queue = asyncio.Queue()

    async def handler(connection) -> None:
        await accepted.put(connection)

    await b.listen(handler)
    signaler.peers[b.local_peer_id] = b.accept_offer
    address = PeerAddress("webrtc", "127.0.0.1", 9, b.local_peer_id)
    try:
        with pytest.raises(HandshakeError):  # the listener refuses the offer: no answer, no DTLS fingerprint
            await a.dial(address, connect_timeout_s=5.0)
        assert not a._connections and not a._pending and not b._pending and accepted.empty()
        connection = await c.dial(address, connect_timeout_s=10.0)  # a holder of the listener's key connects
        assert connection.remote_peer_id == b.local_peer_id
        await connection.aclose()
    finally:
        await a.aclose()
        await b.aclose()
        await c.aclose()


async def test_private_swarm_relay_dial_back_and_relayed_connection_are_keyed() -> None:
    relay = Node(nat=NatOptions(mode="public"), swarm_key=KEY)
    await relay.start()
    auto = Node(bootstrap=[relay.address], nat=NatOptions(), swarm_key=KEY)
    behind = Node(bootstrap=[relay.address], nat=NatOptions(mode="nat"), swarm_key=KEY)
    member = Signaling(Identity.generate(), swarm_key=KEY)
    member.webrtc.direct = False  # relay only: the keyed handshake inside the piped stream
    outsider = Signaling(Identity.generate())
    outsider.webrtc.direct = False
    transports = [member.transport(), outsider.transport()]
    try:
        await auto.start()
        assert auto.address.scheme == "tcp"  # the relay's dial-back reached it: the probe is keyed
        await behind.start()
        assert behind.address.scheme == "webrtc"
        connection = await transports[0].dial(behind.address, connect_timeout_s=10.0)
        assert member.webrtc.connection_paths()[behind.identity.peer_id].startswith("relayed via")
        await connection.aclose()
        with pytest.raises(HandshakeError):  # an outsider cannot even reach the relay (TCP handshake)
            await transports[1].dial(behind.address, connect_timeout_s=5.0)
    finally:
        for transport in transports:
            await transport.aclose()
        await behind.aclose()
        await auto.aclose()
        await relay.aclose()
