"""Output shards: names and contents decided before writing, streamed one tensor at a time.

safetensors' own ``save_file`` needs every tensor of a shard in memory at once. Because the plan
knows every output shape and dtype in advance, we write each shard's header first and then
append tensors as they are computed, so peak memory is one tensor, not one shard. The format is
an 8-byte little-endian header length, a JSON header with byte offsets, then the raw bytes;
validation re-opens every file with the safetensors library.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .keys import SAFE_INDEX, SAFE_SINGLE
from .tensors import ALL_TAGS, DTYPE_SIZES


@dataclass(frozen=True)
class OutTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors tag

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class ShardLayout:
    files: tuple[tuple[str, tuple[OutTensor, ...]], ...]

    @property
    def total_size(self) -> int:
        return sum(t.nbytes for _, tensors in self.files for t in tensors)

    def weight_map(self) -> dict[str, str]:
        return {t.name: name for name, tensors in self.files for t in tensors}


def plan_shards(tensors: list[OutTensor], max_shard_bytes: int) -> ShardLayout:
    """Greedy split in the given order, like transformers: a tensor larger than the bound gets its own shard."""
    groups: list[list[OutTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if groups[-1] and size + tensor.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    groups = [g for g in groups if g]
    if len(groups) == 1:
        return ShardLayout(((SAFE_SINGLE, tuple(groups[0])),))
    total = len(groups)
    return ShardLayout(tuple((f"model-{i:05d}-of-{total:05d}.safetensors", tuple(g)) for i, g in enumerate(groups, 1)))


def write_index(folder: Path, layout: ShardLayout) -> None:
    if len(layout.files) == 1:
        return
    index = {"metadata": {"total_size": layout.total_size}, "weight_map": dict(sorted(layout.weight_map().items()))}
    (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")


class ShardWriter:
    """Writes one shard: header up front, then each tensor's bytes in the declared order.

    A tensor may arrive in several row blocks; the writer checks that each tensor gets exactly
    its declared number of bytes before the next one starts.
    """

    def __init__(self, path: Path, tensors: tuple[OutTensor, ...], metadata: dict[str, str] | None = None):
        self.path = path
        self.expected = list(tensors)
        header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        for t in tensors:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # 8-byte alignment keeps tensor data aligned for mmap readers
        self.handle = open(path, "wb")
        self.handle.write(struct.pack("<Q", len(raw)) + raw)
        self.position = 0  # index of the tensor being written
        self.written = 0  # bytes of it written so far

    def write(self, name: str, block) -> None:
        """Append ``block`` (CPU torch tensor in the output dtype: the tensor or its next rows)."""
        import torch

        spec = self.expected[self.position] if self.position < len(self.expected) else None
        tag = ALL_TAGS.get(str(block.dtype).removeprefix("torch."))
        if spec is None or name != spec.name or tag != spec.dtype:
            raise RuntimeError(f"internal error: shard {self.path.name} expected {spec} next, got {name} {block.dtype}")
        data = block.detach().contiguous().reshape(-1).view(torch.uint8)
        if self.written + data.numel() > spec.nbytes:
            raise RuntimeError(f"internal error: {name} got more than its {spec.nbytes} bytes")
        self.handle.write(memoryview(data.numpy()))
        self.written += data.numel()
        if self.written == spec.nbytes:
            self.position += 1
            self.written = 0

    def close(self) -> None:
        if self.position != len(self.expected):
            self.handle.close()
            raise RuntimeError(f"internal error: shard {self.path.name} closed after {self.position} of {len(self.expected)} tensors")
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
