"""A small PNG reader (zlib + the five scanline filters, RFC 2083 / PNG spec section 9) and a colour-region counter.

Enough for Chromium's screenshots: 8-bit RGB or RGBA, not interlaced. No Pillow in the venv, and the screenshot
check only needs "how many solid rectangles of this colour are there".
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_png(path: Path) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB bytes) of an 8-bit RGB/RGBA non-interlaced PNG."""
    data = path.read_bytes()
    if not data.startswith(_SIGNATURE):
        raise ValueError(f"{path} is not a PNG")
    pos, idat, header = len(_SIGNATURE), [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if header is None:
        raise ValueError(f"{path} has no IHDR")
    width, height, depth, colour, _, _, interlace = header
    if depth != 8 or colour not in (2, 6) or interlace:
        raise ValueError(f"unsupported PNG: depth {depth}, colour type {colour}, interlace {interlace}")
    channels = 3 if colour == 2 else 4
    stride = width * channels
    raw = zlib.decompress(b"".join(idat))
    rows: list[bytes] = []
    previous = bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        _unfilter(kind, line, previous, channels)
        rows.append(bytes(line) if channels == 3 else bytes(b for i, b in enumerate(line) if i % 4 != 3))
        previous = line
    return width, height, rows


def _unfilter(kind: int, line: bytearray, prev: bytearray, bpp: int) -> None:
    if kind == 0:
        return
    if kind == 2:  # Up
        for i in range(len(line)):
            line[i] = (line[i] + prev[i]) & 0xFF
        return
    for i in range(len(line)):
        left = line[i - bpp] if i >= bpp else 0
        if kind == 1:  # Sub
            line[i] = (line[i] + left) & 0xFF
        elif kind == 3:  # Average
            line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif kind == 4:  # Paeth
            up, up_left = prev[i], prev[i - bpp] if i >= bpp else 0
            p = left + up - up_left
            pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
            line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else up_left)) & 0xFF
        else:
            raise ValueError(f"unknown PNG filter type {kind}")


def hex_rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def count_rectangles(rows: list[bytes], width: int, colour: tuple[int, int, int], *, min_width: int,
                     min_height: int, tolerance: int = 2) -> int:
    """Solid regions of `colour` at least min_width x min_height (smaller ones, e.g. legend swatches, ignored).

    Regions are the 4-connected components of matching pixels, found run by run: each row's runs of matching
    pixels are joined (union-find) with the runs they overlap in the row above; a region's size is its bounding box.
    """
    image = np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(len(rows), width, 3).astype(np.int16)
    mask = np.all(np.abs(image - np.array(colour, dtype=np.int16)) <= tolerance, axis=2)
    parent: list[int] = []
    boxes: list[list[int]] = []  # per run: x0, x1, y0, y1 (inclusive)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    above: list[tuple[int, int, int]] = []  # (x0, x1, run id) of the previous row
    for y in range(mask.shape[0]):
        edges = np.flatnonzero(np.diff(np.concatenate(([0], mask[y].astype(np.int8), [0]))))
        current = []
        for x0, x1 in zip(edges[::2], edges[1::2] - 1, strict=True):
            run = len(parent)
            parent.append(run)
            boxes.append([int(x0), int(x1), y, y])
            for a0, a1, other in above:
                if a0 <= x1 and x0 <= a1:
                    root_a, root_b = find(other), find(run)
                    if root_a != root_b:
                        parent[root_b] = root_a
            current.append((int(x0), int(x1), run))
        above = current
    regions: dict[int, list[int]] = {}
    for run, (x0, x1, y0, y1) in enumerate(boxes):
        box = regions.setdefault(find(run), [x0, x1, y0, y1])
        box[:] = [min(box[0], x0), max(box[1], x1), min(box[2], y0), max(box[3], y1)]
    return sum(1 for x0, x1, y0, y1 in regions.values() if x1 - x0 + 1 >= min_width and y1 - y0 + 1 >= min_height)
