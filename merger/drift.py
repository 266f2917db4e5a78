"""Version drift: adapters whose tensors mean something else under the PEFT that merges them.

Each known drift is detected from the adapter's recorded ``peft_version`` (PEFT writes it since
0.18; an adapter without it was saved by an older PEFT) and the model's own shapes, then
handled, and said, or refused by name. Pure: facts in, decisions out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .adapter import AdapterInfo
from .layout import ModelLayout
from .plan_experts import ExpertPair, expert_pairs

PEFT_WITH_VERSION = (0, 18, 0)  # the first PEFT that records peft_version in adapter_config.json


def peft_version(config: dict) -> tuple[int, int, int] | None:
    """The PEFT version that saved the adapter; None when it did not record one (PEFT < 0.18)."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", str(config.get("peft_version") or ""))
    if not match:
        return None
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def saved_before(config: dict, version: tuple[int, int, int]) -> bool:
    found = peft_version(config)
    return found is None or found < version


def version_label(config: dict) -> str:
    return f"peft_version {config['peft_version']}" if config.get("peft_version") else "no peft_version (PEFT < 0.18)"


# ------------------------------------------------------------------ LoRA on stacked expert parameters

# PEFT before 0.19.1 gave a LoRA on a 3-D expert parameter (experts, d1, d2) the other orientation
# than PEFT does since (peft #3165): 0.17-0.18 read d1 as the input for every layout, 0.19.0 swapped
# exactly when the experts are stored (experts, in, out). Today's PEFT takes the input from the
# layout. The two orientations hold the same update with A and B exchanged (and regrouped, since
# PEFT stacks A expert-major and B rank-major); measured exact against PEFT 0.18.0 and 0.19.0.
EXPERT_ORIENTATION_FIXED = (0, 19, 1)


def expert_orientation(adapter: AdapterInfo, layout: ModelLayout, owners: dict[str, str]) -> tuple[list[ExpertPair], str | None]:
    """(pairs saved in the old orientation, to be regrouped; a refusal), from shapes and the version."""
    old, ambiguous = [], []
    for pair in expert_pairs(adapter, layout, owners):
        experts, d1, d2 = layout.param_shapes[pair.parameter]
        module = pair.parameter.rsplit(".", 1)[0]
        meta = layout.modules.get(module)
        in_now, out_now = (d1, d2) if meta is not None and meta.transposed else (d2, d1)
        a_cols, b_rows = adapter.tensors[pair.a_key].shape[1], adapter.tensors[pair.b_key].shape[0]
        if (a_cols, b_rows) == (in_now, out_now) and in_now != out_now:
            continue  # today's orientation, proven by the shapes
        if (a_cols, b_rows) == (out_now, in_now) and in_now != out_now:
            old.append(pair)
        elif in_now == out_now and saved_before(adapter.config, EXPERT_ORIENTATION_FIXED):
            ambiguous.append(pair)
    if ambiguous:
        return [], (f"{adapter.folder / 'adapter_config.json'}: {version_label(adapter.config)}, and LoRA on "
                    f"{ambiguous[0].parameter} ({len(ambiguous)} expert parameters in all): PEFT before 0.19.1 saved LoRA on "
                    "stacked experts in the other orientation (peft #3165), and these experts are square, so the shapes "
                    "cannot tell which this adapter has; re-save it with PEFT >= 0.19.1 from the training checkpoint")
    return old, None


def regroup_expert_pair(a, b, experts: int):
    """The other orientation of one expert LoRA pair: A (E·r, x), B (y, r·E) -> A' (E·r, y), B' (x, r·E).

    The same update either way: ΔW_e = Σ_r A[e, r, :] ⊗ B[:, r, e] read with in and out exchanged.
    Its own inverse.
    """
    er, x = a.shape
    y = b.shape[0]
    rank = er // experts
    new_a = b.reshape(y, rank, experts).permute(2, 1, 0).reshape(experts * rank, y).contiguous()
    new_b = a.reshape(experts, rank, x).permute(2, 1, 0).reshape(x, rank * experts).contiguous()
    return new_a, new_b


# ------------------------------------------------------- scaled embeddings (Gemma 3) before PEFT 0.18

# Gemma 3's embedding multiplies its output by sqrt(hidden) in its forward. PEFT before 0.18
# (peft #2809, fixed by #2825) added a LoRA embedding's update after that scaling, unscaled, and
# computed trainable tokens with F.embedding, skipping the scaling for every token. The trained
# model is reproduced by folding the missing 1/scale into the weights: the LoRA update divided by
# the scale; with trainable tokens the whole embedding divided by it, the (tied) head keeping the
# unscaled matrix it was trained with. Measured exact against PEFT 0.17.1.
SCALED_EMBEDDING_FIXED = (0, 18, 0)


@dataclass(frozen=True)
class ScaledEmbeddingDrift:
    scale: float  # the embedding's forward factor, in the output dtype
    kind: str  # "lora": the LoRA update went in unscaled; "tokens": the whole embedding did

    def note(self, adapter: AdapterInfo, module: str) -> str:
        what = ("its LoRA update on the embedding was trained unscaled, so it is merged divided by the scale"
                if self.kind == "lora" else
                "its trainable tokens made the embedding skip the scaling for every token, so the embedding is written "
                "divided by the scale and the head keeps the unscaled matrix it was trained with (untied)")
        return (f"{adapter.folder}: {version_label(adapter.config)}: {module} scales its output by {self.scale:g} and PEFT "
                f"before 0.18 ignored that (peft #2809/#2825): {what}; the merge reproduces the model as trained "
                "(the stream engine writes it; PEFT today would not)")


def scaled_embedding_drift(adapter: AdapterInfo, layout: ModelLayout, roles: dict[str, str], dtype: str):
    """(the drift, or None; a refusal, or None) for the embedding's adapter tensors ``roles``."""
    meta = layout.modules.get(layout.embed_module) if layout.embed_module else None
    if meta is None or not meta.embed_scale or meta.embed_scale == 1.0:
        return None, None
    if not saved_before(adapter.config, SCALED_EMBEDDING_FIXED):
        return None, None
    lora = "lora_embedding_A" in roles
    tokens = "trainable_tokens" in roles
    if lora and tokens:
        return None, (f"{adapter.folder}: {version_label(adapter.config)}: LoRA and trainable tokens on the scaled embedding "
                      f"{layout.embed_module} together, which PEFT before 0.18 computed in a way merger does not reproduce; "
                      "merge it with the PEFT version that trained it")
    if not (lora or tokens):
        return None, None
    if "lora_magnitude" in roles:
        return None, (f"{adapter.folder}: {version_label(adapter.config)}: DoRA on the scaled embedding {layout.embed_module}, "
                      "which PEFT before 0.18 scaled differently; merge it with the PEFT version that trained it")
    return ScaledEmbeddingDrift(round_to_dtype(meta.embed_scale, dtype), "lora" if lora else "tokens"), None


def round_to_dtype(value: float, dtype: str) -> float:
    """``value`` as a tensor of ``dtype`` holds it (the forward casts the scale to the weights' dtype)."""
    import struct

    single = struct.unpack("<f", struct.pack("<f", value))[0]
    if dtype == "float16":
        return struct.unpack("<e", struct.pack("<e", single))[0]
    if dtype == "bfloat16":  # the top 16 bits of the float32, rounded to nearest even
        bits = struct.unpack("<I", struct.pack("<f", single))[0]
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return struct.unpack("<f", struct.pack("<I", bits))[0]
    return single
