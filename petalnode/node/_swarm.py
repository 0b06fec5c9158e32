"""Reading a model's swarm state out of the DHT.

A server announces the same `Announcement` under every block key it hosts; a reader looks up every block key
of the model and merges what it finds into a `SwarmView` (the pure policy modules take it from there). Only a
server's newest announcement counts (highest record seq). Records that do not decode are skipped: the DHT
already verified their signatures, but their contents are untrusted.
"""

from __future__ import annotations

import logging

from petalnode.dht import Announcement, DHTNode, block_key
from petalnode.errors import CodecError
from petalnode.identity import PeerId
from petalnode.node._swarm_view import SwarmView

log = logging.getLogger(__name__)


async def fetch_swarm(dht: DHTNode, model: str, num_blocks: int) -> SwarmView:
    """The current announcements of every server of `model`, merged."""
    keys = {block_key(model, block): block for block in range(num_blocks)}
    found = await dht.get_many(keys)
    # A server's current state is its newest record: after a move or a re-check, records under blocks it left
    # may still say something older, and must not outvote what it says now.
    newest: dict[PeerId, tuple[int, bytes]] = {}
    for by_writer in found.values():
        for peer_id, record in by_writer.items():
            if peer_id not in newest or record.seq > newest[peer_id][0]:
                newest[peer_id] = (record.seq, record.value)
    records: dict[int, dict[PeerId, Announcement]] = {}
    for key, by_writer in found.items():
        block = keys[key]
        for peer_id, record in by_writer.items():
            if record.value != newest[peer_id][1]:
                continue
            try:
                records.setdefault(block, {})[peer_id] = Announcement.from_bytes(record.value)
            except CodecError as e:
                log.debug("skipping undecodable announcement from %s under %s: %s", peer_id, key, e)
    return SwarmView.from_block_records(num_blocks, records, model=model)
