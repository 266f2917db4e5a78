"""Gather every fact a plan needs about a base and an adapter (reads headers, configs, and the
two adapter matrices whose equality decides tying); decisions are left to plan.py."""

from __future__ import annotations

import math

from dataclasses import dataclass
from pathlib import Path

from .adapter import AdapterInfo, inspect_adapter_folder
from .checkpoint import CheckpointInfo, inspect_checkpoint_folder
from .keys import module_leaf
from .layout import ModelLayout, build_layout
from .plan_groups import CLASSIFIER_HEADS, resolve_module



@dataclass(frozen=True)
class Facts:
    base: CheckpointInfo
    adapter: AdapterInfo
    layout: ModelLayout
    embed_head_equal: bool | None  # the adapter's embedding and head copies hold the same values
    non_finite: tuple[str, ...] = ()  # adapter tensors holding NaN or Inf


def gather_facts(base_dir: Path, adapter_dir: Path, trust_remote_code: bool = False, trainer_dir: Path | None = None) -> Facts:
    """``trainer_dir``: for a named adapter (DIR/sft/ given as DIR), DIR, where the trainer saved the tokenizer."""
    adapter = inspect_adapter_folder(adapter_dir, base_dir, trainer_dir)
    base = inspect_checkpoint_folder(base_dir)
    layout = build_layout(base_dir, base.config, base.tensors, adapter.task_type, classifier_rows(adapter), trust_remote_code)
    return Facts(base, adapter, layout, embed_head_equal(adapter, layout), non_finite_tensors(adapter))


CHECK_BLOCK_BYTES = 16 << 20  # as the stream engine's blocks


def non_finite_tensors(adapter: AdapterInfo) -> tuple[str, ...]:
    """Adapter tensors with a NaN or Inf anywhere (a diverged run): merged, they poison the weights
    whatever validation then runs. Read in row blocks with pread into one reused buffer: a mapped
    file would count every page it touched as the process's memory."""
    import torch

    path = adapter.folder / adapter.weights_file
    floating = [k for k, m in adapter.tensors.items() if m.dtype in ("F64", "F32", "F16", "BF16")]
    if path.suffix != ".safetensors":
        state = torch.load(path, map_location="cpu", weights_only=True)
        return tuple(k for k in floating if not torch.isfinite(state[k]).all())
    from .engines.stream import Scratch, TensorFiles

    reader, buffers, bad = TensorFiles(adapter.folder, adapter.tensors), Scratch("cpu"), []
    try:
        for key in floating:
            meta = adapter.tensors[key]
            rows = meta.shape[0] if meta.shape else 1
            row_shape = tuple(meta.shape[1:])
            step = max(1, CHECK_BLOCK_BYTES // max(1, meta.nbytes // max(1, rows)))
            for i in range(0, rows, step):
                j = min(rows, i + step)
                block = buffers.take("check", (j - i,) + row_shape, reader.torch_dtype(key))
                reader.read_rows(key, i, j, block)
                # a finite sum proves every element finite (NaN propagates, an infinity is not cancelled)
                # at a sixth of isfinite's cost; isfinite decides only when the sum may have overflowed
                if not math.isfinite(float(block.sum(dtype=torch.float32))) and not torch.isfinite(block).all():
                    bad.append(key)
                    break
    finally:
        reader.close()
    return tuple(bad)


def classifier_rows(adapter: AdapterInfo) -> int | None:
    """Rows of a classifier head saved whole (SEQ_CLS 'score'), i.e. num_labels."""
    for key in adapter.keys:
        if key.role == "full_weight" and module_leaf(key.module) in CLASSIFIER_HEADS:
            return adapter.tensors[key.key].shape[0]
    return None


def embed_head_equal(adapter: AdapterInfo, layout: ModelLayout) -> bool | None:
    """For a tied base: do the adapter's embedding and head tensors hold the same values, role by role?"""
    if not layout.tied or not layout.embed_module or not layout.head_module:
        return None

    def keys_of(module: str) -> dict[str, str]:
        return {k.role: k.key for k in adapter.keys
                if k.role in ("full_weight", "trainable_tokens") and resolve_module(layout, k.module) == module}

    embed, head = keys_of(layout.embed_module), keys_of(layout.head_module)
    if not embed or not head:
        return None
    if embed.keys() != head.keys():
        return False
    if any(adapter.tensors[embed[r]].shape != adapter.tensors[head[r]].shape for r in embed):
        return False
    import torch

    path = adapter.folder / adapter.weights_file
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return all(torch.equal(handle.get_tensor(embed[r]), handle.get_tensor(head[r])) for r in embed)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return all(torch.equal(state[embed[r]], state[head[r]]) for r in embed)
