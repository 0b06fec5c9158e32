"""petalnode.rpc: request/response and bidirectional-stream RPC over any `petalnode.transport.Transport`.

This layer sits above `petalnode.transport` (which never imports it) and below `petalnode.node`.
"""

from petalnode.rpc._rpc import RPC, RPC_TIMEOUT_S, CallContext, StreamHandler, UnaryHandler
from petalnode.rpc._rpc_stream import HEARTBEAT_INTERVAL_S, HEARTBEAT_TIMEOUT_S, RPCStream

__all__ = [
    "HEARTBEAT_INTERVAL_S",
    "HEARTBEAT_TIMEOUT_S",
    "RPC",
    "RPC_TIMEOUT_S",
    "CallContext",
    "RPCStream",
    "StreamHandler",
    "UnaryHandler",
]
