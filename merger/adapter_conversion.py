"""Saved adapters rewritten into the form today's PEFT reads, in a scratch folder: everything after
(plan, engines, validation through PEFT) then sees an ordinary adapter.

PEFT's conversion of a PiSSA-family adapter, from the initial adapter saved before training:

PiSSA, OLoRA, CorDA, LoRA-GA and LoftQ start training from ``W = W_res + s·B0·A0`` and leave
the base rewritten to ``W_res``. The trained adapter (A, B) fits only ``W_res``; against the
original ``W`` the update is ``ΔW = s·(B·A − B0·A0)``. PEFT writes that as a plain LoRA of twice
the rank: ``A' = [A; A0]``, ``B' = [B, −B0]``, ``r' = 2r`` and alpha scaled to keep ``s``
(``save_pretrained(path_initial_model_for_weight_conversion=...)``). merger does the same into a
scratch folder, so everything after it (plan, engines, validation through PEFT) sees an ordinary
converted adapter.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from .errors import AdapterError, IncompatibleError
from .inputs import confined, copy_input_file, input_files, short
from .keys import ADAPTER_CONFIG, parse_adapter_key
from .plan_rules import BASE_MUTATING_INITS

log = logging.getLogger(__name__)


def mutating_init(config: dict) -> str | None:
    """The base-mutating init family an adapter config names (PiSSA, OLoRA, ...), or None."""
    init = config.get("init_lora_weights")
    if not isinstance(init, str):
        return None
    return next((name for prefix, name in BASE_MUTATING_INITS.items() if init.lower().startswith(prefix)), None)


def converted_config(config: dict) -> dict:
    """The config PEFT writes for the converted adapter: rank doubled, the scale s = alpha/r (or
    alpha/sqrt(r) with rsLoRA) unchanged, and an init that no longer rewrites the base."""
    if config.get("use_rslora") and (config.get("rank_pattern") or config.get("alpha_pattern")):
        raise IncompatibleError("--initial-adapter: PEFT cannot convert an rsLoRA adapter with rank_pattern or alpha_pattern "
                                "(the doubled rank changes each module's scale differently); merge with --residual-base instead")
    out = dict(config)
    out["init_lora_weights"] = True
    out["r"] = 2 * config["r"]
    out["lora_alpha"] = config.get("lora_alpha", 8) * (math.sqrt(2) if config.get("use_rslora") else 2)
    for name in ("rank_pattern", "alpha_pattern"):
        if config.get(name):
            out[name] = {key: 2 * value for key, value in config[name].items()}
    return out


def pair_initial_tensors(trained: dict, initial: dict, adapter_dir: Path, initial_dir: Path) -> list[str]:
    """Every trained LoRA A/B key has its initial twin of the same shape; returns initial keys not part
    of the conversion (modules_to_save copies saved at init), which PEFT ignores too."""
    def lora_keys(metas):
        return {k for k in metas if (parsed := parse_adapter_key(k)) and parsed.role in ("lora_A", "lora_B")}

    mine, theirs = lora_keys(trained), lora_keys(initial)
    missing = sorted(mine - theirs)
    if missing:
        raise IncompatibleError(f"--initial-adapter {initial_dir}: has no initial values for {short(missing[0])} "
                                f"({len(missing)} LoRA tensors of {adapter_dir} in all); pass the adapter saved before "
                                "training of this same run")
    extra = sorted(theirs - mine)
    if extra:
        raise IncompatibleError(f"--initial-adapter {initial_dir}: holds {short(extra[0])}, which {adapter_dir} does not "
                                "train; pass the initial adapter of this same run")
    for key in sorted(mine):
        if tuple(trained[key].shape) != tuple(initial[key].shape):
            raise IncompatibleError(f"--initial-adapter {initial_dir}: {short(key)} is {list(initial[key].shape)} there but "
                                    f"{list(trained[key].shape)} in {adapter_dir}: another rank or model; pass the initial "
                                    "adapter of this same run")
    return sorted(set(initial) - theirs)


def convert_with_initial(adapter_dir: Path, initial_dir: Path, target: Path, tokenizer_dir: Path | None = None) -> Path:
    """Write the converted adapter into ``target`` (a fresh folder); return it.

    The adapter folder's other files (tokenizer, generation config) are copied beside it, and the
    trainer folder's tokenizer (``tokenizer_dir``) when the adapter folder has none.
    """
    import torch

    from .adapter import read_adapter_config, read_adapter_tensors
    from .engines.stream import open_tensors

    config = read_adapter_config(adapter_dir)
    initial_config = read_adapter_config(initial_dir)
    if initial_config.get("peft_type", "").upper() != "LORA":
        raise AdapterError(f"--initial-adapter {initial_dir}: peft_type {short(initial_config.get('peft_type'))}, not a LoRA adapter")
    if mutating_init(config) is None:
        raise IncompatibleError(f"--initial-adapter {initial_dir}: {adapter_dir / ADAPTER_CONFIG} has init_lora_weights="
                                f"{short(config.get('init_lora_weights'))}, which does not rewrite the base: there is nothing to "
                                "convert; merge without --initial-adapter")
    trained_file, trained = read_adapter_tensors(adapter_dir)
    initial_file, initial = read_adapter_tensors(initial_dir)
    embedding = next((k for k in trained if (p := parse_adapter_key(k)) and p.role.startswith("lora_embedding")), None)
    if embedding:
        raise IncompatibleError(f"--initial-adapter: {adapter_dir} trains an embedding with LoRA ({short(embedding)}), which "
                                "PEFT's conversion does not carry (it converts Linear LoRA only), so there is no converted "
                                "model to reproduce; merge it into its residual base with --residual-base")
    ignored = pair_initial_tensors(trained, initial, adapter_dir, initial_dir)
    if ignored:
        log.info("--initial-adapter: %d tensors of %s are not LoRA pairs (copies saved at init); the conversion ignores them, "
                 "as PEFT's does", len(ignored), initial_dir)
    trained_reader, initial_reader = open_tensors(adapter_dir, trained_file, trained), open_tensors(initial_dir, initial_file, initial)
    try:
        state = {}
        for key in trained:
            value = trained_reader.read(key)
            role = parse_adapter_key(key).role
            if role == "lora_A":  # [A; A0]: the initial rows after the trained ones
                value = torch.cat([value, initial_reader.read(key).to(value.dtype)], dim=0)
            elif role == "lora_B":  # [B, -B0]
                value = torch.cat([value, -initial_reader.read(key).to(value.dtype)], dim=1)
            state[key] = value.contiguous()
    finally:
        trained_reader.close()
        initial_reader.close()
    return write_adapter(adapter_dir, trained_file, state, converted_config(config), target, tokenizer_dir)


def write_adapter(adapter_dir: Path, weights_file: str, state: dict, config: dict, target: Path,
                  tokenizer_dir: Path | None = None) -> Path:
    """``target``: an adapter folder with ``state`` as its weights and ``config`` as its config, and
    every other file of ``adapter_dir`` (tokenizer, generation config) beside them; the trainer
    folder's tokenizer (``tokenizer_dir``) when the adapter folder has none."""
    from safetensors.torch import save_file

    target.mkdir(parents=True)
    save_file(state, str(target / "adapter_model.safetensors"), metadata={"format": "pt"})
    (target / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    for path in input_files(adapter_dir, "adapter folder"):
        if path.name not in (ADAPTER_CONFIG, weights_file):
            copy_input_file(adapter_dir, path.name, target, "adapter folder")
    if tokenizer_dir is not None and not any((target / n).exists() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        from .tokenizer_facts import tokenizer_files_in

        for name in tokenizer_files_in(tokenizer_dir):
            if (tokenizer_dir / name).is_file() and not (target / name).exists():
                copy_input_file(tokenizer_dir, name, target, "trainer folder")
    return target


def regrouped_expert_adapter(adapter_dir: Path, pairs, target: Path, tokenizer_dir: Path | None = None) -> Path:
    """The adapter with its expert LoRA pairs saved in PEFT < 0.19.1's orientation turned into today's
    (drift.regroup_expert_pair); every other tensor as it was."""
    from .adapter import read_adapter_config, read_adapter_tensors
    from .drift import regroup_expert_pair
    from .engines.stream import open_tensors

    config = read_adapter_config(adapter_dir)
    weights_file, metas = read_adapter_tensors(adapter_dir)
    reader = open_tensors(adapter_dir, weights_file, metas)
    try:
        state = {key: reader.read(key).contiguous() for key in metas}
    finally:
        reader.close()
    for pair in pairs:
        state[pair.a_key], state[pair.b_key] = regroup_expert_pair(state[pair.a_key], state[pair.b_key], pair.experts)
    return write_adapter(adapter_dir, weights_file, state, config, target, tokenizer_dir)
