"""Reading tensors for validation: block by block, through the safetensors library (a different
road than the engines' pread), so validation's memory is a few blocks whatever the model's size.

Readers share one interface: ``pieces(key, indexes)``, ``slice(key, index, stop=None)``,
``read(key)`` (whole: small tensors only), ``exact(key)`` (the base's own bytes: copies compare bit
for bit) and ``close()``.
"""

from __future__ import annotations

import math
from pathlib import Path

from .tensors import numel

# Every value check reads row blocks of at most BLOCK_BYTES (counted as float32 work, as the stream
# engine counts its blocks), so validation's memory is a few blocks whatever the model's size.
BLOCK_BYTES = 16 << 20


def release_freed_memory() -> None:
    """Hand the heap memory an engine freed back to the system before the value checks allocate their
    own blocks (glibc keeps freed blocks resident: measured +30 MB of peak at 3B; elsewhere a no-op)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def row_step(shape) -> int:
    """Rows of a tensor of this shape per block: BLOCK_BYTES of float32 at most, one row at least."""
    return max(1, BLOCK_BYTES // max(1, numel(shape[1:]) * 4))


def row_blocks(rows: int, shape):
    """(start, stop) of consecutive row blocks covering ``rows`` rows of a tensor of ``shape``."""
    step = row_step(shape)
    return [(i, min(rows, i + step)) for i in range(0, rows, step)]


def index_blocks(shape):
    """Indexes that cover a tensor of ``shape`` in pieces of at most BLOCK_BYTES of float32 (one
    innermost row at least): row blocks, or blocks of a deeper dimension when one row is too big
    (a fused (experts, out, in) tensor)."""
    import itertools

    depth = 0
    while depth < len(shape) - 1 and numel(shape[depth + 1:]) * 4 > BLOCK_BYTES:
        depth += 1
    step = row_step(shape[depth:])
    for lead in itertools.product(*(range(n) for n in shape[:depth])):
        for i in range(0, shape[depth], step):
            yield lead + (slice(i, min(shape[depth], i + step)),)


def all_finite(tensors, name: str, shape) -> bool:
    if not shape:
        blocks = (tensors.read(name),)
    else:
        blocks = (tensors.slice(name, index) for index in index_blocks(shape))
    return all(block_finite(block) for block in blocks)


def block_finite(block) -> bool:
    import torch

    if block.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        block = block.float()  # float8: sums and isfinite are defined on the wider types
    # a sum is finite only when every element is (NaN propagates; an infinity is not cancelled by
    # finite values, and +inf + -inf is NaN) and costs a sixth of isfinite, which decides only
    # when the sum is not finite (it may have overflowed)
    return math.isfinite(float(block.sum())) or bool(torch.isfinite(block).all())


def non_finite_tensors(tensors, metas: dict, floating: set[str]) -> list[str]:
    """Names of the floating tensors holding NaN or Inf, read in blocks. Tensors smaller than a block
    are read in groups from one opening of their file (an MoE checkpoint has thousands of small
    expert tensors: opening the file for each, which parses its header, dominated the check)."""
    bad, group, size = [], [], 0

    def flush():
        nonlocal group, size
        if group:
            bad.extend(name for name, block in zip(group, tensors.wholes(group)) if not block_finite(block))
        group, size = [], 0

    grouped = hasattr(tensors, "wholes")
    for name in sorted(floating, key=lambda n: (metas[n].file, metas[n].offset)):
        meta = metas[name]
        if grouped and meta.shape and meta.nbytes * 2 <= BLOCK_BYTES:
            if group and (metas[group[0]].file != meta.file or size + meta.nbytes * 2 > BLOCK_BYTES):
                flush()
            group.append(name)
            size += meta.nbytes * 2
        elif not all_finite(tensors, name, meta.shape):
            bad.append(name)
    flush()
    return sorted(bad)


def _runs(indices) -> list[tuple[int, int]]:
    """Consecutive runs [start, stop) covering the distinct ``indices``, in ascending order."""
    runs: list[list[int]] = []
    for index in sorted(set(indices)):
        if runs and runs[-1][1] == index:
            runs[-1][1] = index + 1
        else:
            runs.append([index, index + 1])
    return [(i, j) for i, j in runs]


def gather(tensors, key: str, indices, dim: int = 0):
    """Rows (``dim=0``) or columns (``dim=1``) at ``indices`` (any order, repeats allowed) in
    float32, one read per run of consecutive indices."""
    import torch

    runs = _runs(indices)
    pieces = tensors.pieces(key, [(slice(i, j),) if dim == 0 else (slice(None), slice(i, j)) for i, j in runs])
    stacked = torch.cat([p.float() for p in pieces], dim=dim) if len(pieces) > 1 else pieces[0].float()
    if list(indices) == sorted(set(indices)):  # ascending, no repeats: already in place
        return stacked
    position, offset = {}, 0
    for i, j in runs:
        for index in range(i, j):
            position[index] = offset + index - i
        offset += j - i
    return stacked.index_select(dim, torch.tensor([position[i] for i in indices], dtype=torch.long))


class StartRows:
    """Rows of a module's start weight in float32, as the engines build it: the base's rows (or the
    adapter's replacement), truncated or grown to ``rows`` with the new-rows rule (lora.grow_rows on
    the float32 weight: the mean of the existing rows, or zeros)."""

    def __init__(self, tensors, key: str, shape, rows: int, rule: str):
        self.tensors, self.key, self.shape, self.rows, self.rule = tensors, key, tuple(shape), rows, rule
        self.have = min(shape[0], rows)
        self._fill = None

    def __call__(self, i: int, j: int):
        import torch

        k = min(j, self.have)
        parts = [self.tensors.slice(self.key, slice(i, k)).float()] if i < k else []
        if j > max(i, self.have):
            parts.append(self.fill().expand(j - max(i, self.have), *self.shape[1:]))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def at(self, indices):
        """Rows at ``indices`` (any order)."""
        import torch

        read = [r for r in indices if r < self.have]
        known = dict(zip(read, gather(self.tensors, self.key, read))) if read else {}
        return torch.stack([known[r] if r in known else self.fill()[0] for r in indices])

    def fill(self):
        import torch

        if self._fill is None:
            if self.rule == "zeros" or self.shape[0] == 0:
                self._fill = torch.zeros((1,) + self.shape[1:])
            else:
                total = torch.zeros(self.shape[1:], dtype=torch.float64)
                for i, j in row_blocks(self.shape[0], self.shape):
                    total += self.tensors.slice(self.key, i, j).sum(dim=0, dtype=torch.float64)
                self._fill = (total / self.shape[0]).float().unsqueeze(0)
        return self._fill


class ErrorNorm:
    """‖got - expected‖ / ‖expected‖ accumulated block by block: squares of float32 block norms summed
    as Python floats (no float64 copy of a block; NaN stays NaN)."""

    def __init__(self):
        self.diff = self.ref = 0.0

    def add(self, got, expected) -> None:
        from torch.linalg import vector_norm

        self.diff += float(vector_norm(got - expected)) ** 2
        self.ref += float(vector_norm(expected)) ** 2

    def value(self) -> float:
        return math.sqrt(self.diff) / max(math.sqrt(self.ref), 1e-12)


class LibraryTensors:
    """Tensors read through the safetensors library (``safe_open``), independent of the engine's reader.

    The library hands out views of a mapping of the whole file, alive while the handle or any view
    is: every page a view touched counts as this process's memory until then. So each read opens
    the file, and a block's pages leave the process with the block.
    """

    def __init__(self, folder: Path, metas: dict):
        self.folder, self.metas = folder, metas

    def pieces(self, key: str, indexes: list) -> list:
        """``tensor[index]`` for each index (tuples of ints and slices), from one opening of the file."""
        from safetensors import safe_open

        with safe_open(str(self.folder / self.metas[key].file), framework="pt") as handle:
            tensor_slice = handle.get_slice(key)
            return [tensor_slice[index] for index in indexes]

    def slice(self, key: str, index, stop: int | None = None):
        """Rows [index, stop) when ``stop`` is given, else ``tensor[index]``."""
        return self.pieces(key, [slice(index, stop) if stop is not None else index])[0]

    def read(self, key: str):
        """The whole tensor (for small ones: adapter matrices, scalars)."""
        from safetensors import safe_open

        with safe_open(str(self.folder / self.metas[key].file), framework="pt") as handle:
            return handle.get_tensor(key)

    def wholes(self, keys: list[str]) -> list:
        """Several small tensors of one file, whole, from one opening of it (copies: the mapping goes with the handle)."""
        from safetensors import safe_open

        with safe_open(str(self.folder / self.metas[keys[0]].file), framework="pt") as handle:
            return [handle.get_tensor(key).clone() for key in keys]

    def exact(self, key: str) -> bool:
        return True  # stored bytes

    def close(self) -> None:
        pass  # nothing stays open between reads


class LoadedTensors:
    """Legacy pickle files (adapter_model.bin, pytorch_model*.bin), loaded whole (a pickle has no
    header to seek in), with LibraryTensors' interface."""

    def __init__(self, *paths: Path):
        from .engines.stream import PickledTensors

        self.state = PickledTensors(*paths).state

    def pieces(self, key: str, indexes: list) -> list:
        return [self.state[key][index] for index in indexes]

    def slice(self, key: str, index, stop: int | None = None):
        return self.state[key][slice(index, stop) if stop is not None else index]

    def read(self, key: str):
        return self.state[key]

    def exact(self, key: str) -> bool:
        return True

    def close(self) -> None:
        self.state = {}


class WholeTensors:
    """LibraryTensors' interface over a reader of whole tensors (stage_reference.ComputedStage: what an
    earlier stage of a stack wrote, recomputed); blocks are cut from the last tensor read, kept."""

    def __init__(self, source):
        self.source, self.key, self.tensor = source, None, None

    def read(self, key: str):
        if key != self.key:
            self.key, self.tensor = None, None  # one tensor at a time
            self.tensor, self.key = self.source.read(key), key
        return self.tensor

    def pieces(self, key: str, indexes: list) -> list:
        tensor = self.read(key)
        return [tensor[index] for index in indexes]

    def slice(self, key: str, index, stop: int | None = None):
        return self.read(key)[slice(index, stop) if stop is not None else index]

    def exact(self, key: str) -> bool:
        """True when the stages left the base's bytes as they were (copies compare bit for bit)."""
        return self.source.exact(key)

    def close(self) -> None:
        self.key = self.tensor = None
        self.source.close()


def open_base(plan):
    """The tensors ``plan`` starts from, read independently of the engines: the base checkpoint (a
    quantized one as the dequantized model it stands for), or for a later stage of a stack, the
    earlier stages' output recomputed from the base."""
    if plan.previous is not None:
        from .stage_reference import ComputedStage

        reader = WholeTensors(ComputedStage(plan.previous))
    else:
        from .engines.dequant_source import dequantized_reference

        reader = dequantized_reference(plan.base) or open_independently(plan.base.folder, plan.base.tensors)
    requantized = {op.base_key: op.requantize for op in plan.ops if op.requantize and op.base_key}
    return RequantizedTensors(reader, requantized) if requantized else reader


def open_independently(folder: Path, metas: dict):
    """A reader of a folder's tensors that shares no code with the stream engine's."""
    files = sorted({m.file for m in metas.values()})
    if all(name.endswith(".safetensors") for name in files):
        return LibraryTensors(folder, metas)
    return LoadedTensors(*(folder / name for name in files))


class RequantizedTensors:
    """Another reader's tensors with some replaced by their round trip through a 4-bit format
    (--merge-base nf4: the base a QLoRA run trained against). The round trip ties every block of a
    tensor together (NF4's double quantization), so it is made whole, one tensor at a time."""

    def __init__(self, source, formats: dict[str, str]):
        self.source, self.formats = source, formats
        self.key = self.tensor = None

    def _whole(self, key: str):
        from .quantized import nf4_round_trip

        if key != self.key:
            self.key = self.tensor = None
            self.tensor, self.key = nf4_round_trip(self.source.read(key)), key
        return self.tensor

    def read(self, key: str):
        return self._whole(key) if key in self.formats else self.source.read(key)

    def pieces(self, key: str, indexes: list) -> list:
        if key not in self.formats:
            return self.source.pieces(key, indexes)
        tensor = self._whole(key)
        return [tensor[index] for index in indexes]

    def slice(self, key: str, index, stop: int | None = None):
        if key not in self.formats:
            return self.source.slice(key, index, stop)
        return self._whole(key)[slice(index, stop) if stop is not None else index]

    def exact(self, key: str) -> bool:
        return self.source.exact(key)

    def close(self) -> None:
        self.key = self.tensor = None
        self.source.close()
