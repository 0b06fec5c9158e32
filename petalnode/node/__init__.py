"""The daemon (bootstrap and server roles), the swarm client, and the pure policies they share.

The block server and the swarm client need torch; they are loaded on first access (PEP 562), so the daemon's
bootstrap role imports this package without loading torch or transformers.
"""

import typing

from petalnode import _lazy
from petalnode.node._backend import ComputeBackend, InlineExecutor, LoraCapableBackend, TorchBackend
from petalnode.node._bans import BanList
from petalnode.node._executor import PRIORITY_BULK, PRIORITY_INFERENCE, ComputeExecutor
from petalnode.node._fair_share import FairShareLimits
from petalnode.node._health import Probe, ProbeStatus, health_report, model_health
from petalnode.node._health_probe import collect_health, probe_servers
from petalnode.node._local_swarm import LocalSwarm, SwarmProcess, parse_span
from petalnode.node._node import DEFAULT_RECORD_TTL_S, Node, NodeState, ServeOptions
from petalnode.node._observed import ObservedSpeeds
from petalnode.node._placement import choose_blocks, should_move
from petalnode.node._routing import RouteHop, choose_route, costed_throughputs, route_cost_s, same_weights
from petalnode.node._signaling import NatOptions, Signaling
from petalnode.node._swarm import fetch_swarm
from petalnode.node._swarm_view import ServerView, SwarmView, describe_runs

if typing.TYPE_CHECKING:
    from petalnode.node._block_server import BlockServer, HostedSpan
    from petalnode.node._remote_chain import RemoteBlockChain, RemoteChainSession
    from petalnode.node._swarm_client import SwarmClient, SwarmSession
    from petalnode.node._verification import VerifyMode, VerifyStats

__all__ = [
    "DEFAULT_RECORD_TTL_S",
    "PRIORITY_BULK",
    "PRIORITY_INFERENCE",
    "BanList",
    "BlockServer",
    "ComputeBackend",
    "ComputeExecutor",
    "FairShareLimits",
    "HostedSpan",
    "InlineExecutor",
    "LocalSwarm",
    "LoraCapableBackend",
    "NatOptions",
    "Node",
    "NodeState",
    "ObservedSpeeds",
    "Probe",
    "ProbeStatus",
    "RemoteBlockChain",
    "RemoteChainSession",
    "RouteHop",
    "ServeOptions",
    "ServerView",
    "Signaling",
    "SwarmClient",
    "SwarmProcess",
    "SwarmSession",
    "SwarmView",
    "TorchBackend",
    "VerifyMode",
    "VerifyStats",
    "choose_blocks",
    "choose_route",
    "collect_health",
    "costed_throughputs",
    "describe_runs",
    "fetch_swarm",
    "health_report",
    "model_health",
    "parse_span",
    "probe_servers",
    "route_cost_s",
    "same_weights",
    "should_move",
]

# Need torch: loaded on first access, then cached in the package namespace.
__getattr__, __dir__ = _lazy.exports(__name__, globals(), {
    "petalnode.node._block_server": ("BlockServer", "HostedSpan"),
    "petalnode.node._remote_chain": ("RemoteBlockChain", "RemoteChainSession"),
    "petalnode.node._swarm_client": ("SwarmClient", "SwarmSession"),
    "petalnode.node._verification": ("VerifyMode", "VerifyStats"),
})
