"""petalnode.transport: pluggable transports (TCP, WebRTC, in-memory) behind one interface.

Callers code against `Transport` / `Connection` / `Stream` (RPC on top of them is `petalnode.rpc`); which
transport carries the bytes is chosen by the address scheme (`tcp://`, `memory://`, `webrtc://`); `MultiTransport`
combines several.
"""

from petalnode.transport._base import (
    CONNECT_TIMEOUT_S,
    Connection,
    ConnectionConfig,
    ConnectionHandler,
    EndOfStreamError,
    Listener,
    Stream,
    Transport,
)
from petalnode.transport._memory import LinkConfig, MemoryDatagramTransport, MemoryNetwork
from petalnode.transport._memory_transport import MemoryTransport
from petalnode.transport._multi import MultiTransport
from petalnode.transport._relayed import RelayChannel, RelayData
from petalnode.transport._stun import StunServer
from petalnode.transport._tcp import TcpTransport
from petalnode.transport._webrtc import IceServer, RelaySignaler, Signaler, WebRTCTransport, describe_path
from petalnode.transport._webrtc_signing import SignedDescription

__all__ = [
    "CONNECT_TIMEOUT_S",
    "Connection",
    "ConnectionConfig",
    "ConnectionHandler",
    "EndOfStreamError",
    "IceServer",
    "LinkConfig",
    "Listener",
    "MemoryDatagramTransport",
    "MemoryNetwork",
    "MemoryTransport",
    "MultiTransport",
    "RelayChannel",
    "RelayData",
    "RelaySignaler",
    "Signaler",
    "SignedDescription",
    "Stream",
    "StunServer",
    "TcpTransport",
    "Transport",
    "WebRTCTransport",
    "describe_path",
]
