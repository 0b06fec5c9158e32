# A minimal STUN server (RFC 5389 section 7.3.1 Binding only), so peers learn their public (server-reflexive)
# address from a public node of the swarm instead of an outside service.
#
# Invariants:
# - Exactly one reply per valid Binding request, never larger than the request plus 20 bytes (XOR-MAPPED-ADDRESS
#   of IPv6 and a FINGERPRINT), so the server cannot be used to amplify traffic.
# - Anything that is not a Binding request is dropped silently (RFC 5389 section 7.3: unknown messages from
#   unauthenticated peers are not answered). Message parsing is aioice's (`aioice.stun`).

from __future__ import annotations

import asyncio
import contextlib
import logging

from aioice import stun

from petalnode.errors import ClosedResourceError, TransportError

log = logging.getLogger(__name__)


class _StunProtocol(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.answered = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a _SelectorDatagramTransport

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        try:
            request = stun.parse_message(data)
        except ValueError:
            return
        if request.message_method != stun.Method.BINDING or request.message_class != stun.Class.REQUEST:
            return
        response = stun.Message(
            message_method=stun.Method.BINDING, message_class=stun.Class.RESPONSE,
            transaction_id=request.transaction_id,
        )
        response.attributes["XOR-MAPPED-ADDRESS"] = (str(addr[0]), int(addr[1]))
        response.add_fingerprint()
        if self.transport is not None:
            self.transport.sendto(bytes(response), addr)
            self.answered += 1


class StunServer:
    """Answers STUN Binding requests on one UDP socket; an async context manager.

    Args:
        host: the address to bind (the node's listen host).
        port: UDP port, 0 for any free one (the node tells peers which, over RPC).
    """

    def __init__(self, host: str = "0.0.0.0", port: int = 0) -> None:
        self._host = host
        self._port = port
        self._protocol: _StunProtocol | None = None
        self._closed = False

    @property
    def port(self) -> int:
        if self._protocol is None or self._protocol.transport is None:
            raise TransportError("the STUN server is not started")
        return int(self._protocol.transport.get_extra_info("sockname")[1])

    @property
    def answered(self) -> int:
        """How many binding requests were answered (for tests and status)."""
        return self._protocol.answered if self._protocol is not None else 0

    async def start(self) -> StunServer:
        if self._closed:
            raise ClosedResourceError('STUN server: cannot start in state "closed"')
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await loop.create_datagram_endpoint(_StunProtocol, local_addr=(self._host, self._port))
        except OSError as e:
            raise TransportError(f"cannot listen for STUN on UDP {self._host}:{self._port}: {e}") from None
        self._protocol = protocol
        log.info("STUN server on UDP %s:%d", self._host, self.port)
        return self

    async def __aenter__(self) -> StunServer:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        if self._protocol is not None and self._protocol.transport is not None:
            with contextlib.suppress(Exception):
                self._protocol.transport.close()
