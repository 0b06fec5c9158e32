"""petalnode.transport: pluggable transports (TCP, in-memory) behind one interface, and RPC on top."""

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
from petalnode.transport._tcp import TcpTransport

__all__ = [
    "CONNECT_TIMEOUT_S",
    "Connection",
    "ConnectionConfig",
    "ConnectionHandler",
    "EndOfStreamError",
    "LinkConfig",
    "Listener",
    "MemoryDatagramTransport",
    "MemoryNetwork",
    "MemoryTransport",
    "Stream",
    "TcpTransport",
    "Transport",
]
