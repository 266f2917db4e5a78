"""PEFT's adapter types besides LoRA: which merger merges (through PEFT's own merge_and_unload on
the peft engine), which it refuses and why, and how their tensors are named.

LoRA and trainable tokens have closed forms merger applies itself (both engines, per-module
checks). The other types are merged by PEFT, with merger's resizing, tensor accounting,
tokenizer handling and report around it, and always proven by comparing logits with the
unmerged adapter (there is no per-module check for them).
"""

from __future__ import annotations

from .keys import PEFT_PREFIX, AdapterKey

# peft_type -> the prefix PEFT gives the type's tensors (peft's PEFT_TYPE_TO_PREFIX_MAPPING; a test
# keeps the two in step). Each merges exactly with PEFT's merge_and_unload (tests/test_peft_types.py).
MERGED_BY_PEFT = {
    "ADALORA": "lora_", "BOFT": "boft_", "C3A": "c3a_", "DELORA": "delora_", "FOURIERFT": "fourierft_",
    "GRALORA": "gralora_", "HRA": "hra_", "IA3": "ia3_", "LN_TUNING": "ln_tuning_", "LOHA": "hada_",
    "LOKR": "lokr_", "MISS": "miss_", "OFT": "oft_", "RANDLORA": "randlora_", "ROAD": "road_",
    "SHIRA": "shira_", "VBLORA": "vblora_", "VERA": "vera_lambda_", "WAVEFT": "waveft_",
}

# types whose effect depends on the input at run time: no single weight matrix equals them
CANNOT_MERGE = {
    "POLY": "Polytropon routes between several LoRA modules per task id at run time",
    "XLORA": "X-LoRA mixes several adapters per token with a learned classifier at run time",
    "LILY": "PEFT implements no merge for LiLy (its adapters are shared across layers and routed)",
    "ADAPTION_PROMPT": "LLaMA-Adapter adds gated attention over learned prompts at run time",
    "CARTRIDGE": "a cartridge is a trained KV cache prefix, not a weight update",
}
RENAMED = {
    "BONE": "PEFT renamed Bone to MiSS (peft_type MISS) and no longer loads BONE adapters; convert it with PEFT's "
            "MiSS conversion or merge it with the PEFT version that trained it",
}


def tuner_prefix(peft_type: str) -> str | None:
    return MERGED_BY_PEFT.get(peft_type)


def parse_tuner_key(key: str, peft_type: str) -> AdapterKey | None:
    """A tensor of a PEFT-merged type: ``module.<prefix>...`` (role ``tuner``), or a tensor shared by
    every module (VeRA's projections, VB-LoRA's vector bank: no module, role ``shared``). None when the
    key is not the type's (modules_to_save copies, trainable tokens: parsed as for LoRA)."""
    prefix = MERGED_BY_PEFT[peft_type]
    if not key.startswith(PEFT_PREFIX):
        stem = key.removeprefix("base_model.")
        return AdapterKey(key, "", "shared") if stem.startswith(prefix.split("_")[0]) else None
    parts = key[len(PEFT_PREFIX):].split(".")
    for i, part in enumerate(parts):
        if i and part.startswith(prefix):
            return AdapterKey(key, ".".join(parts[:i]), "tuner")
    return None


def refusal(peft_type: str) -> str | None:
    """Why a peft_type is not merged, or None when it is."""
    if peft_type in ("LORA", "TRAINABLE_TOKENS") or peft_type in MERGED_BY_PEFT:
        return None
    if peft_type in CANNOT_MERGE:
        return f"peft_type {peft_type} cannot be merged into plain weights: {CANNOT_MERGE[peft_type]}; keep serving it with PEFT"
    if peft_type in RENAMED:
        return f"peft_type {peft_type}: {RENAMED[peft_type]}"
    known = ", ".join(["LORA", "TRAINABLE_TOKENS"] + sorted(MERGED_BY_PEFT))
    return (f"peft_type {peft_type} is not one merger has proven it merges (it merges {known}); merge it with PEFT's "
            "merge_and_unload and check it with merge-adapter validate")
