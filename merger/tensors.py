"""Tensor facts from file headers: names, shapes and dtypes without reading any weights.

Checkpoint files are untrusted input. Every safetensors header goes through
:func:`read_safetensors_header`, which checks it the way the format defines it (and as the
safetensors library does) before any offset in it is used: a header that lies about where a
tensor's bytes are would otherwise make the merge read the wrong bytes and write a "valid"
checkpoint.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError

# safetensors dtype tag -> bits per element (every tag the format defines; sub-byte ones pack)
DTYPE_BITS = {
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8,
    "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "U16": 16, "U32": 32, "U64": 64,
    "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
# bytes per element of the whole-byte dtypes (what row-addressed reads need)
DTYPE_SIZES = {tag: bits // 8 for tag, bits in DTYPE_BITS.items() if bits % 8 == 0}
TORCH_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
SAFETENSORS_TAGS = {v: k for k, v in TORCH_NAMES.items()}
# every torch dtype safetensors stores, by torch's name (integer and bool tensors are copied as they are)
ALL_TAGS = {**SAFETENSORS_TAGS, "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
            "bool": "BOOL", "uint16": "U16", "uint32": "U32", "uint64": "U64", "float8_e4m3fn": "F8_E4M3",
            "float8_e5m2": "F8_E5M2", "float8_e8m0fnu": "F8_E8M0", "complex64": "C64"}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own bound


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors tag, e.g. "BF16"
    file: str  # file name relative to its folder
    offset: int = -1  # where its bytes start in a safetensors file (-1: not a safetensors file)

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * DTYPE_BITS.get(self.dtype, 32) // 8


def numel(shape) -> int:
    """Elements in a tensor of this shape (1 for a scalar)."""
    count = 1
    for dim in shape:
        count *= dim
    return count


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _Duplicate(key)
        seen[key] = value
    return seen


class _Duplicate(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def read_safetensors_header(path: Path, error=CheckpointError, name: str | None = None) -> dict[str, TensorMeta]:
    """Parse and check the header of one safetensors file; raises ``error`` naming the first fault.

    The format: an 8-byte little-endian length, a JSON object of tensors (dtype, shape,
    data_offsets relative to the end of the header) and optional string ``__metadata__``, then
    the data. A valid file's offsets start at 0, are contiguous and non-overlapping, each range
    holds exactly numel x dtype size bytes, and together they cover the rest of the file exactly.
    The safetensors library then parses the same header on its own; both must agree.
    ``name`` is the file's path relative to its folder as the index gives it (default: its name).
    """
    fix = "re-download or re-save it"
    file_name = name or path.name
    _require_regular_file(path, error)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise error(f"{path}: not a safetensors file ({size} bytes, no header); {fix}")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8 or header_len > MAX_HEADER_BYTES:
                raise error(f"{path}: corrupt safetensors header (claims {header_len} header bytes in a "
                            f"{size}-byte file, at most {MAX_HEADER_BYTES}); {fix}")
            raw = handle.read(header_len)
    except PermissionError:
        raise error(f"{path}: cannot be read (permission denied); fix its permissions") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except _Duplicate as dup:
        raise error(f"{path}: corrupt safetensors header: tensor {_short(dup.key)} is listed twice; {fix}") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise error(f"{path}: corrupt safetensors header (not JSON); {fix}") from None
    if not isinstance(header, dict):
        raise error(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object); {fix}")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise error(f"{path}: corrupt safetensors header: __metadata__ must map strings to strings; {fix}")
    data_start = 8 + header_len
    entries = []
    for name, entry in header.items():
        where = f"{path}: tensor {_short(name)}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise error(f"{where}: header entry lacks dtype, shape or data_offsets; {fix}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise error(f"{where} has dtype {_short(dtype)}, which safetensors does not define; "
                        f"the file is corrupt or from an unknown writer: {fix}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise error(f"{where}: shape {_short(shape)} is not a list of non-negative integers; {fix}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise error(f"{where}: data_offsets {_short(offsets)} are not [begin, end] with 0 <= begin <= end; {fix}")
        bits = numel(shape) * DTYPE_BITS[dtype]
        if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
            needs = f"{bits // 8}" if bits < 10**30 else "more"
            raise error(f"{where}: {dtype} {_short(shape)} needs {needs} bytes but its data_offsets span "
                        f"{offsets[1] - offsets[0]}; {fix}")
        entries.append((offsets[0], offsets[1], name, TensorMeta(name, tuple(shape), dtype, file_name, data_start + offsets[0])))
    entries.sort(key=lambda e: (e[0], e[1]))
    expected_begin = 0
    for begin, end, name, _ in entries:
        if begin != expected_begin:
            what = "overlaps the tensor before it" if begin < expected_begin else "leaves a gap before it"
            raise error(f"{path}: tensor {_short(name)} starts at byte {begin} of the data, where {expected_begin} "
                        f"was expected: it {what}; {fix}")
        expected_begin = end
    if data_start + expected_begin != size:
        state = "truncated" if data_start + expected_begin > size else "longer than its header says"
        raise error(f"{path}: {state}: the file has {size} bytes, its header needs {data_start + expected_begin}; "
                    + ("the download or save did not finish, fetch it again" if size < data_start + expected_begin else fix))
    metas = {name: meta for _, _, name, meta in entries}
    _agree_with_library(path, metas, error)
    return metas


def _agree_with_library(path: Path, metas: dict[str, TensorMeta], error) -> None:
    """The safetensors library's own parse of the same file must accept it and see the same tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            theirs = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    except Exception as exc:  # SafetensorError and whatever a newer library raises for a bad file
        raise error(f"{path}: the safetensors library refuses it ({_short(str(exc), 160)}); re-download or re-save it") from None
    ours = {k: m.shape for k, m in metas.items()}
    if theirs != ours:
        differ = sorted(set(theirs) ^ set(ours)) or sorted(k for k in ours if theirs[k] != ours[k])
        raise error(f"{path}: the safetensors library reads its header differently ({_short(differ[:3])}); re-download or re-save it")


def _short(value, limit: int = 80) -> str:
    from .inputs import short

    return short(value, limit)


def _require_regular_file(path: Path, error) -> None:
    """A regular file, not a FIFO that would block a read forever, a folder, or a link to nothing."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{path}: is a link to nothing (or vanished); re-download the file") from None
    if not stat.S_ISREG(mode):
        raise error(f"{path}: is not a regular file; replace it with the weights file it should be")


def read_torch_bin_metas(path: Path, error=CheckpointError, name: str | None = None) -> dict[str, TensorMeta]:
    """Shapes of a legacy pickle checkpoint, loaded safely (weights_only) since pickle has no header."""
    import torch

    file_name = name or path.name
    _require_regular_file(path, error)
    try:
        state = torch.load(path, map_location="meta", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad pickle
        raise error(f"{path}: cannot be read safely as a weights-only torch file ({type(exc).__name__}); convert it to safetensors") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise error(f"{path}: holds a {type(state).__name__}, not a mapping of tensor names to tensors; convert it to safetensors")
    return {
        key: TensorMeta(key, tuple(t.shape), SAFETENSORS_TAGS.get(str(t.dtype).removeprefix("torch."), "F32"), file_name)
        for key, t in state.items()
    }
