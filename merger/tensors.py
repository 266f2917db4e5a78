"""Tensor facts from file headers: names, shapes and dtypes without reading any weights."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError

# safetensors dtype tag -> bytes per element
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}
TORCH_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
SAFETENSORS_TAGS = {v: k for k, v in TORCH_NAMES.items()}


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors tag, e.g. "BF16"
    file: str  # file name relative to its folder
    offset: int = -1  # where its bytes start in a safetensors file (-1: not a safetensors file)

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * DTYPE_SIZES.get(self.dtype, 4)


def read_safetensors_header(path: Path, error=CheckpointError) -> dict[str, TensorMeta]:
    """Parse the JSON header of one safetensors file and check the file is complete.

    Reading the header by hand (it is an 8-byte length and a JSON object) lets us report a
    truncated or corrupt file by name before anything is loaded.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise error(f"{path}: not a safetensors file ({size} bytes, no header); re-download or re-save it")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8 or header_len > 100_000_000:
                raise error(
                    f"{path}: corrupt safetensors header (claims {header_len} header bytes in a "
                    f"{size}-byte file); re-download or re-save it"
                )
            header = json.loads(handle.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise error(f"{path}: corrupt safetensors header (not JSON); re-download or re-save it") from None
    if not isinstance(header, dict):
        raise error(f"{path}: corrupt safetensors header; re-download or re-save it")
    header.pop("__metadata__", None)
    data_end = 0
    metas: dict[str, TensorMeta] = {}
    for name, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            metas[name] = TensorMeta(name, tuple(entry["shape"]), entry["dtype"], path.name, 8 + header_len + begin)
        except (KeyError, TypeError, ValueError):
            raise error(f"{path}: corrupt safetensors header entry for {name!r}; re-download or re-save it") from None
        if metas[name].dtype not in DTYPE_SIZES:
            raise error(f"{path}: tensor {name!r} has dtype {metas[name].dtype!r}, which safetensors does not define; "
                        "the file is corrupt or from an unknown writer: re-download or re-save it")
        data_end = max(data_end, end)
    expected = 8 + header_len + data_end
    if size < expected:
        raise error(
            f"{path}: truncated: the file has {size} bytes, its header needs {expected}; "
            "the download or save did not finish, fetch it again"
        )
    return metas


def read_torch_bin_metas(path: Path, error=CheckpointError) -> dict[str, TensorMeta]:
    """Shapes of a legacy pickle checkpoint, loaded safely (weights_only) since pickle has no header."""
    import torch

    try:
        state = torch.load(path, map_location="meta", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad pickle
        raise error(f"{path}: cannot be read safely as a weights-only torch file ({type(exc).__name__}); convert it to safetensors") from None
    return {
        name: TensorMeta(name, tuple(t.shape), SAFETENSORS_TAGS.get(str(t.dtype).removeprefix("torch."), "F32"), path.name)
        for name, t in state.items()
    }
