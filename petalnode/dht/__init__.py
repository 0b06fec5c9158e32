"""petalnode.dht: a hardened Kademlia DHT (the `kademlia` package, subclassed) with signed per-writer records."""

from petalnode.dht._announcement import (
    BLOCKS_PER_KEY,
    MAX_ADAPTERS,
    Announcement,
    ServerState,
    block_key,
    block_keys,
    model_keys,
)
from petalnode.dht._node import DHTNode, NodeState, RefreshHandle
from petalnode.dht._record import MAX_CLOCK_SKEW_S, MAX_RECORD_TTL_S, MAX_VALUE_BYTES, Record, dht_key

__all__ = [
    "BLOCKS_PER_KEY",
    "MAX_ADAPTERS",
    "MAX_CLOCK_SKEW_S",
    "MAX_RECORD_TTL_S",
    "MAX_VALUE_BYTES",
    "Announcement",
    "DHTNode",
    "NodeState",
    "Record",
    "RefreshHandle",
    "ServerState",
    "block_key",
    "block_keys",
    "dht_key",
    "model_keys",
]
