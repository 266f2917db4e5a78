"""Pure LoRA arithmetic, matching PEFT's definitions.

Every function takes tensors and returns tensors; no files, no modules. Deltas are computed in
float32 because a bf16 matmul loses the low bits of a rank-64 update before it is added.
"""

from __future__ import annotations

import math
import re


def pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first pattern matching the end of the module path."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def linear_delta(lora_a, lora_b, scale: float, fan_in_fan_out: bool = False):
    """ΔW for a Linear (out, in) weight, or a GPT-2 Conv1D (in, out) weight when fan_in_fan_out."""
    delta = (lora_b.float() @ lora_a.float()) * scale
    return delta.T if fan_in_fan_out else delta


def embedding_delta(lora_embedding_a, lora_embedding_b, scale: float):
    """ΔW for an Embedding (num, dim) weight: A is (r, num), B is (dim, r)."""
    return (lora_embedding_b.float() @ lora_embedding_a.float()).T * scale


def dora_weight(weight, delta, magnitude, fan_in_fan_out: bool = False):
    """DoRA's merged weight: magnitude · (W + ΔW) / ‖W + ΔW‖, the norm taken per output row.

    Both ``weight`` and ``delta`` are in the module's storage layout; the norm is over the input
    dimension as PEFT computes it (after undoing the Conv1D transpose). PEFT treats an Embedding
    (num, dim) the same way as a Conv1D, so its magnitude has one entry per embedding dimension
    and each column is normalised over all rows: pass ``fan_in_fan_out=True`` for both.
    """
    combined = weight.float() + delta
    oriented = combined.T if fan_in_fan_out else combined
    norm = oriented.norm(p=2, dim=1, keepdim=True)
    merged = oriented * (magnitude.float().view(-1, 1) / norm)
    return merged.T if fan_in_fan_out else merged


def grow_rows(weight, rows: int, rule: str = "mean"):
    """``weight`` with exactly ``rows`` rows: truncated, or extended with untrained rows.

    The extra rows are the mean of the existing rows ('mean', what transformers' mean resizing
    does on average, without its random noise, so the result is reproducible) or zeros.
    """
    import torch

    current = weight.shape[0]
    if rows <= current:
        return weight[:rows]
    extra_shape = (rows - current,) + tuple(weight.shape[1:])
    if rule == "zeros" or current == 0:
        extra = torch.zeros(extra_shape, dtype=weight.dtype, device=weight.device)
    else:
        extra = weight.float().mean(dim=0, keepdim=True).to(weight.dtype).expand(extra_shape)
    return torch.cat([weight, extra], dim=0)
