"""Read only the tensors a node needs from a safetensors checkpoint.

Invariants:
- Only `*.safetensors` files are ever opened (never pickled `.bin` weights).
- A single-file checkpoint and a sharded one (`model.safetensors.index.json`) look the same to callers.
- Every tensor read is counted in `bytes_loaded`, so tests can prove that a server hosting blocks [10, 20)
  never read blocks outside that range; bytes read for hashing (compute/_digest.py) count in `bytes_hashed`.
- `locate` gives a tensor's stored bytes as a byte range of its file, checked against the file's size, so
  hashing reads exactly the stored (little-endian, per safetensors) bytes without building a tensor.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from petalnode.compute._digest import TensorLocation
from petalnode.errors import ConfigError, ModelNotFoundError

_SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}


@dataclass
class CheckpointReader:
    """Maps tensor names to shard files and reads tensors one by one (memory-mapped by safetensors)."""

    directory: Path
    file_of: dict[str, Path]
    bytes_loaded: int = 0
    tensors_loaded: int = 0
    bytes_hashed: int = 0
    _shapes: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict, repr=False)
    _locations: dict[str, TensorLocation] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, directory: str | Path) -> CheckpointReader:
        directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        file_of: dict[str, Path] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{index} is not a valid safetensors index: {e}") from e
            for name, file_name in weight_map.items():
                path = (directory / file_name).resolve()
                if path.parent != directory.resolve() or path.suffix != ".safetensors":
                    raise ConfigError(f"{index} points outside the model directory or to a non-safetensors file")
                file_of[name] = path
        else:
            files = sorted(directory.glob("*.safetensors"))
            if not files:
                raise ModelNotFoundError(f"no *.safetensors files in {directory}")
            for path in files:
                with safe_open(str(path), framework="pt") as handle:
                    for name in handle.keys():
                        file_of[name] = path
        return cls(directory=directory, file_of=file_of)

    def names(self) -> list[str]:
        return sorted(self.file_of)

    def tensor_nbytes(self, names: Iterable[str]) -> int:
        """Size of the named tensors as stored, read from the file headers only."""
        total = 0
        for name in names:
            shape, dtype = self._header_entry(name)
            numel = 1
            for dim in shape:
                numel *= dim
            total += numel * _SAFETENSORS_DTYPE_BYTES.get(dtype, 4)
        return total

    def _header_entry(self, name: str) -> tuple[tuple[int, ...], str]:
        if name not in self._shapes:
            self._read_header(self.file_of[name])
        return self._shapes[name]

    def locate(self, name: str) -> TensorLocation:
        """Where tensor `name`'s stored bytes are (from its file's header). Raises `ConfigError` if malformed."""
        if name not in self._locations:
            self._read_header(self.file_of[name])
        if name not in self._locations:
            raise ConfigError(f"{self.file_of[name]} has no tensor {name!r} although the index says so")
        return self._locations[name]

    def read_raw(self, location: TensorLocation, chunk_bytes: int = 8 * 1024**2) -> Iterator[bytes]:
        """The stored bytes of a located tensor, in chunks (for hashing; counted in `bytes_hashed`)."""
        with open(location.path, "rb") as handle:
            handle.seek(location.begin)
            left = location.end - location.begin
            while left > 0:
                chunk = handle.read(min(chunk_bytes, left))
                if not chunk:
                    raise ConfigError(f"{location.path} ended inside tensor {location.name!r}")
                left -= len(chunk)
                self.bytes_hashed += len(chunk)
                yield chunk

    def _read_header(self, path: Path) -> None:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            if not 0 < header_len <= size - 8:
                raise ConfigError(f"{path} is not a safetensors file (header length {header_len})")
            try:
                header = json.loads(handle.read(header_len))
            except ValueError as e:
                raise ConfigError(f"{path} has a malformed safetensors header: {e}") from e
        data_start = 8 + header_len
        for key, value in header.items():
            if key == "__metadata__":
                continue
            try:
                shape, dtype = tuple(int(d) for d in value["shape"]), str(value["dtype"])
                begin, end = (data_start + int(o) for o in value["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise ConfigError(f"{path}: malformed header entry for {key!r}: {e}") from e
            if not data_start <= begin <= end <= size:
                raise ConfigError(f"{path}: tensor {key!r} lies outside the file")
            self._shapes[key] = (shape, dtype)
            self._locations[key] = TensorLocation(name=key, dtype=dtype, shape=shape, path=path, begin=begin,
                                                  end=end)

    def load(
        self,
        select: Callable[[str], bool],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
    ) -> dict[str, torch.Tensor]:
        """Read every tensor whose name `select` accepts, and nothing else."""
        wanted = [name for name in self.file_of if select(name)]
        by_file: dict[Path, list[str]] = {}
        for name in wanted:
            by_file.setdefault(self.file_of[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for path, names in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for name in names:
                    tensor = handle.get_tensor(name)
                    self.bytes_loaded += tensor.numel() * tensor.element_size()
                    self.tensors_loaded += 1
                    if dtype is not None and tensor.is_floating_point():
                        tensor = tensor.to(dtype)
                    out[name] = tensor.to(device)
        return out
