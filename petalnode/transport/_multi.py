# One `Transport` made of several, chosen per address scheme: a node dials `tcp://` peers over TCP and
# `webrtc://` peers over WebRTC through the same RPC object and connection pool.
#
# Invariants:
# - `listen` listens on every member with the same handler and returns the primary's listener (the first
#   member: its host and port name the node, and the DHT shares its port number).
# - `dial` goes to the member whose scheme matches the address; an unknown scheme is a `TransportError`.
# - `aclose` closes every member (idempotent as the members are).

from __future__ import annotations

from petalnode.errors import ConfigError, TransportError
from petalnode.identity import PeerAddress, PeerId
from petalnode.transport._base import CONNECT_TIMEOUT_S, Connection, ConnectionHandler, Listener, Transport


class MultiTransport:
    """Several transports behind one, chosen by address scheme; the first is the primary."""

    def __init__(self, primary: Transport, *others: Transport) -> None:
        members = (primary, *others)
        if len({t.scheme for t in members}) != len(members):
            raise ConfigError("MultiTransport members must have distinct schemes")
        if len({t.local_peer_id for t in members}) != 1:
            raise ConfigError("MultiTransport members must share one identity")
        self.members: dict[str, Transport] = {t.scheme: t for t in members}
        self.primary = primary

    @property
    def scheme(self) -> str:
        return self.primary.scheme

    @property
    def local_peer_id(self) -> PeerId:
        return self.primary.local_peer_id

    def member(self, scheme: str) -> Transport | None:
        return self.members.get(scheme)

    def __repr__(self) -> str:
        return f"<MultiTransport {'+'.join(self.members)} {self.local_peer_id}>"

    async def __aenter__(self) -> MultiTransport:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def listen(self, handler: ConnectionHandler, *, host: str | None = None, port: int = 0) -> Listener:
        kwargs = {"port": port} if host is None else {"host": host, "port": port}
        listener = await self.primary.listen(handler, **kwargs)  # type: ignore[arg-type]
        for transport in self.members.values():
            if transport is not self.primary:
                await transport.listen(handler)
        return listener

    async def dial(self, address: PeerAddress, *, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> Connection:
        transport = self.members.get(address.scheme)
        if transport is None:
            raise TransportError(f"cannot dial {address}: no transport for scheme {address.scheme!r} "
                                 f"(have {', '.join(self.members)})")
        return await transport.dial(address, connect_timeout_s=connect_timeout_s)

    async def aclose(self) -> None:
        for transport in reversed(list(self.members.values())):
            await transport.aclose()
