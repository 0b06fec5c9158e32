"""What a client compares servers' announced span digests with: its own copy's block digests, or pinned ones.

A copy with every block's weights hashes them (once; compute/_digest_cache.py keeps them next to the weights).
A copy without them (only the client's head, a partial download) needs digests pinned from a full copy
(`petalnode digest`); without pins it is an error, never a silent "trust every server".
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path

from petalnode.compute._digest import pins_from_json, span_digest
from petalnode.compute._loader import ModelInfo
from petalnode.errors import ConfigError

log = logging.getLogger(__name__)


def span_digest_for(
    info: ModelInfo, pinned_digests: str | os.PathLike[str] | None = None,
) -> Callable[[int, int], bytes]:
    """`(start, end) -> digest` of blocks [start, end) as this client knows them; every later call is a lookup.

    Raises:
        ConfigError: the pin file is unreadable or for another block count, or (without pins) the local copy
            lacks some block's weights; the message says how to pin digests.
    """
    if pinned_digests is not None:
        try:
            name, digests = pins_from_json(Path(pinned_digests).read_text())
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot use the pinned digests {pinned_digests}: {e}") from e
        if len(digests) != info.num_blocks:
            raise ConfigError(f"the pinned digests {pinned_digests} are for {len(digests)} blocks, "
                              f"{info.source.name} has {info.num_blocks}")
        if name != info.source.name:
            log.warning("the pinned digests %s were written for %r; using them for %r", pinned_digests, name,
                        info.source.name)
        return functools.partial(span_digest, digests.__getitem__)
    try:
        info.block_digests(range(info.num_blocks))  # now in memory: span_digest below does no I/O
    except ConfigError as e:
        raise ConfigError(
            f"{e}: this copy of {info.source.name} cannot tell which servers have the same weights. Pin the digests "
            "from a full copy (`petalnode digest --model DIR > pins.json`, then pinned_digests='pins.json' or "
            "--pinned-digests pins.json), or pass span_digest=None to trust every server's weights"
        ) from e
    return info.span_digest
