"""Reading a model's swarm state out of the DHT.

A server announces the same `Announcement` under the key of every group of blocks it overlaps (`block_keys`); a
reader looks up every key of the model (`model_keys`: one per BLOCKS_PER_KEY blocks) and merges what it finds
into a `SwarmView` (the pure policy modules take it from there). Only a server's newest announcement counts
(highest record seq). Records that do not decode are skipped: the DHT already verified their signatures, but
their contents are untrusted.
"""

from __future__ import annotations

import logging

from petalnode.dht import Announcement, DHTNode, model_keys
from petalnode.errors import CodecError
from petalnode.identity import PeerId
from petalnode.node._swarm_view import SwarmView

log = logging.getLogger(__name__)


async def fetch_swarm(dht: DHTNode, model: str, num_blocks: int) -> SwarmView:
    """The current announcements of every server of `model`, merged."""
    keys = model_keys(model, num_blocks)
    found = await dht.get_many(keys)
    # A server's current state is its newest record: after a move or a re-check, records under blocks it left
    # may still say something older, and must not outvote what it says now.
    newest: dict[PeerId, tuple[int, bytes]] = {}
    for by_writer in found.values():
        for peer_id, record in by_writer.items():
            if peer_id not in newest or record.seq > newest[peer_id][0]:
                newest[peer_id] = (record.seq, record.value)
    records: dict[tuple[int, int], dict[PeerId, Announcement]] = {}
    decoded: dict[bytes, Announcement] = {}
    for key, by_writer in found.items():
        blocks = keys[key]
        for peer_id, record in by_writer.items():
            if record.value != newest[peer_id][1]:
                continue
            try:
                if record.value not in decoded:  # the same announcement comes back under each of its keys
                    decoded[record.value] = Announcement.from_bytes(record.value)
                records.setdefault(blocks, {})[peer_id] = decoded[record.value]
            except CodecError as e:
                log.debug("skipping undecodable announcement from %s under %s: %s", peer_id, key, e)
    return SwarmView.from_key_records(num_blocks, records, model=model)
