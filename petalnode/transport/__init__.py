"""petalnode.transport: pluggable transports (TCP, WebRTC, in-memory) behind one interface, and RPC on top.

Callers code against `Transport` / `Connection` / `Stream` (or, above them, `RPC`); which transport carries the
bytes is chosen by the address scheme (`tcp://`, `memory://`, `webrtc://`); `MultiTransport` combines several.
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
from petalnode.transport._relayed import RelayData
from petalnode.transport._rpc import RPC, RPC_TIMEOUT_S, CallContext, StreamHandler, UnaryHandler
from petalnode.transport._rpc_stream import HEARTBEAT_INTERVAL_S, HEARTBEAT_TIMEOUT_S, RPCStream
from petalnode.transport._stun import StunServer
from petalnode.transport._tcp import TcpTransport
from petalnode.transport._webrtc import IceServer, RelaySignaler, Signaler, WebRTCTransport, describe_path
from petalnode.transport._webrtc_signing import SignedDescription

__all__ = [
    "CONNECT_TIMEOUT_S",
    "HEARTBEAT_INTERVAL_S",
    "HEARTBEAT_TIMEOUT_S",
    "RPC",
    "RPC_TIMEOUT_S",
    "CallContext",
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
    "RPCStream",
    "RelayData",
    "RelaySignaler",
    "Signaler",
    "SignedDescription",
    "Stream",
    "StreamHandler",
    "StunServer",
    "TcpTransport",
    "Transport",
    "UnaryHandler",
    "WebRTCTransport",
    "describe_path",
]
