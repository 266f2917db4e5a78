"""Read an adapter folder into AdapterInfo: its config, tensor headers and tokenizer facts.

Nothing here loads weights, except that a legacy ``adapter_model.bin`` has no header and is read
with ``torch.load(weights_only=True)`` onto the meta device.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AdapterError, InputNotFoundError, UnsupportedError
from .inputs import confined, read_json, short
from .keys import ADAPTER_CONFIG, AdapterKey, parse_adapter_key
from .peft_types import MERGED_BY_PEFT, parse_tuner_key, refusal
from .tensors import TensorMeta, read_safetensors_header, read_torch_bin_metas
from .tokenizer_facts import TokenizerFacts, read_tokenizer_facts

log = logging.getLogger(__name__)

SUPPORTED_PEFT_TYPES = ("LORA", "TRAINABLE_TOKENS")
PROMPT_LEARNING = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING", "CPT")
# LoraConfig fields whose non-default values change the model in ways a weight merge cannot express
_REFUSED_LORA_FIELDS = {
    "layer_replication": "it duplicates layers at load time",
    "use_qalora": "QALoRA merges into quantized group weights",
    "alora_invocation_tokens": "activated LoRA only applies after its invocation tokens, so it cannot be merged",
}
# the fields LoraConfig has had; anything else comes from a newer PEFT and only earns a warning
_KNOWN_FIELDS = {
    "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "fan_in_fan_out",
    "inference_mode", "init_lora_weights", "layers_pattern", "layers_to_transform", "loftq_config",
    "lora_alpha", "lora_dropout", "megatron_config", "megatron_core", "modules_to_save", "peft_type",
    "r", "rank_pattern", "revision", "target_modules", "task_type", "use_dora", "use_rslora",
    "layer_replication", "lora_bias", "exclude_modules", "eva_config", "corda_config",
    "trainable_token_indices", "peft_version", "qalora_group_size", "use_qalora",
    "target_parameters", "lora_ga_config", "alora_invocation_tokens", "arrow_config",
    "ensure_weight_tying", "use_bdlora", "kasa_config", "monteclora_config", "velora_config",
    "token_indices", "init_weights", "num_virtual_tokens", "tokenizer_name_or_path",
}


@dataclass(frozen=True)
class AdapterInfo:
    folder: Path
    config: dict[str, Any]
    weights_file: str
    tensors: dict[str, TensorMeta]
    keys: tuple[AdapterKey, ...]
    tokenizer: TokenizerFacts | None
    warnings: tuple[str, ...] = field(default=())

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type", "")).upper()

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora"))

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora"))

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out"))

    @property
    def task_type(self) -> str | None:
        return self.config.get("task_type")

    @property
    def modules_to_save(self) -> list[str]:
        return list(self.config.get("modules_to_save") or [])

    def variants(self) -> list[str]:
        names = [self.peft_type]
        if self.use_dora:
            names.append("DoRA")
        if self.use_rslora:
            names.append("rsLoRA")
        if self.config.get("rank_pattern") or self.config.get("alpha_pattern"):
            names.append("rank/alpha patterns")
        if self.fan_in_fan_out:
            names.append("fan_in_fan_out")
        if self.modules_to_save:
            names.append("modules_to_save=" + ",".join(self.modules_to_save))
        if self.config.get("trainable_token_indices") or self.peft_type == "TRAINABLE_TOKENS":
            names.append("trainable tokens")
        return names


def read_adapter_config(folder: Path) -> dict[str, Any]:
    path = folder / ADAPTER_CONFIG
    if not folder.exists():
        raise InputNotFoundError(f"adapter folder {folder}: does not exist; pass the folder that holds adapter_config.json")
    if not path.is_file():
        hint = ""
        if (folder / "config.json").is_file():
            hint = " (it has config.json: is this a full model rather than an adapter?)"
        raise AdapterError(f"{folder}: not a PEFT adapter: no {ADAPTER_CONFIG}{hint}; pass the folder PEFT's save_pretrained wrote")
    confined(folder, ADAPTER_CONFIG, "adapter folder", AdapterError)
    config = read_json(path, "adapter config", AdapterError)
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object, found {type(config).__name__}")
    if "peft_type" not in config:
        hint = ""
        if "lora_parameters" in config or "fine_tune_type" in config:
            hint = " (it looks like an MLX-LM adapter: fuse it with mlx_lm.fuse, or convert it to PEFT first)"
        raise AdapterError(f"{path}: not a PEFT adapter config: no 'peft_type' key{hint}")
    return config


def check_config(config: dict[str, Any], path: Path) -> list[str]:
    """Refuse what cannot be merged; return warnings for what merely looks new."""
    peft_type = str(config["peft_type"]).upper()
    if peft_type in PROMPT_LEARNING:
        raise UnsupportedError(f"{path}: peft_type {peft_type} is prompt learning: it adds virtual tokens at run time and has no weights to merge; keep using it with PEFT")
    refused = refusal(peft_type)
    if refused:
        raise UnsupportedError(f"{path}: {refused}")
    for name, reason in _REFUSED_LORA_FIELDS.items():
        if config.get(name):
            raise UnsupportedError(f"{path}: {name}={short(config[name])} cannot be merged into plain weights: {reason}")
    if peft_type == "LORA":
        if "r" not in config:
            raise AdapterError(f"{path}: LoRA config lacks 'r'; it is not a complete PEFT LoraConfig")
        _check_value_types(config, path)
    if peft_type not in SUPPORTED_PEFT_TYPES:
        return []  # merged by PEFT itself, whose config class reads its own fields
    unknown = sorted(set(config) - _KNOWN_FIELDS)
    return [f"{path.name}: unknown keys {', '.join(unknown)} (from a newer PEFT?); merged by the known ones"] if unknown else []


MAX_SCALE_NUMBER = 1e6  # ranks and alphas of real adapters are at most a few thousand


def _count(value, limit: float = MAX_SCALE_NUMBER) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= limit


def _number(value) -> bool:
    """A finite number of a sane size: a NaN alpha scales every delta by NaN, a huge one overflows."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return abs(value) <= MAX_SCALE_NUMBER  # False for NaN and infinities; no float conversion of huge ints


def _regex(pattern) -> bool:
    import re

    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError):
        return False
    return True


def _token_ids(value) -> bool:
    return isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**31 for i in value)


def _indices(value) -> bool:
    return value is None or _token_ids(value) or (isinstance(value, dict) and all(isinstance(k, str) and _token_ids(v) for k, v in value.items()))


def _check_value_types(config: dict[str, Any], path: Path) -> None:
    """The LoRA fields the arithmetic uses must have PEFT's types and sane sizes: a hand-edited "16"
    would divide, a NaN or 1e300 alpha would scale every delta into garbage, a bad regex would
    crash the matching."""
    def patterns(check):
        return lambda v: v is None or (isinstance(v, dict) and all(isinstance(k, str) and _regex(k) and check(x) for k, x in v.items()))

    expected = {
        "r": (_count, f"a positive integer (at most {MAX_SCALE_NUMBER:g})"),
        "lora_alpha": (_number, f"a finite number (at most {MAX_SCALE_NUMBER:g} in size)"),
        "rank_pattern": (patterns(_count), "a mapping of module regex to positive integer"),
        "alpha_pattern": (patterns(_number), "a mapping of module regex to finite number"),
        "target_modules": (lambda v: v is None or (isinstance(v, str) and _regex(v)) or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
                           "a list of module names or a valid regex string"),
        "modules_to_save": (lambda v: v is None or (isinstance(v, list) and all(isinstance(x, str) for x in v)), "a list of module names"),
        "trainable_token_indices": (_indices, "a list of token ids, or a mapping of module name to token ids"),
    }
    for key, (ok, what) in expected.items():
        if key in config and not ok(config[key]):
            raise AdapterError(f"{path}: {key} is {short(config[key])} but PEFT writes {what} there; fix the value or re-save the adapter")


def read_adapter_tensors(folder: Path) -> tuple[str, dict[str, TensorMeta]]:
    safe = folder / "adapter_model.safetensors"
    legacy = folder / "adapter_model.bin"
    if safe.is_file() or safe.is_symlink():
        confined(folder, safe.name, "adapter folder", AdapterError)
        return safe.name, read_safetensors_header(safe, error=AdapterError)
    if legacy.is_file() or legacy.is_symlink():
        confined(folder, legacy.name, "adapter folder", AdapterError)
        return legacy.name, read_torch_bin_metas(legacy, error=AdapterError)
    raise AdapterError(f"{folder}: no adapter weights (adapter_model.safetensors or adapter_model.bin); the adapter save did not finish")


def inspect_adapter_folder(folder: str | Path, base_folder: Path | None = None, trainer_folder: Path | None = None) -> AdapterInfo:
    """Facts about the adapter in ``folder``; raises a MergerError for anything unusable."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    warnings = check_config(config, folder / ADAPTER_CONFIG)
    weights_file, tensors = read_adapter_tensors(folder)
    if not tensors:
        raise AdapterError(f"{folder / weights_file}: holds no tensors; the adapter was saved before training or the save failed")
    keys, unknown = [], []
    peft_type = str(config["peft_type"]).upper()
    for name in tensors:
        parsed = (parse_tuner_key(name, peft_type) if peft_type in MERGED_BY_PEFT else None) or parse_adapter_key(name)
        (keys.append(parsed) if parsed else unknown.append(name))
    if unknown:
        raise UnsupportedError(f"{folder / weights_file}: tensors of an unknown layout: {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}; merger will not guess how to merge them")
    # PEFT saves no scalars: matrices for LoRA and token values, vectors at least for the rest
    least = {"lora_A": 2, "lora_B": 2, "lora_embedding_A": 2, "lora_embedding_B": 2, "trainable_tokens": 2}
    wrong = next((k for k in keys if len(tensors[k.key].shape) < least.get(k.role, 1)), None)
    if wrong is not None:
        raise AdapterError(f"{folder / weights_file}: {short(wrong.key)} has shape {list(tensors[wrong.key].shape)}, but PEFT saves "
                           f"its {wrong.role} with at least {least.get(wrong.role, 1)} dimensions; the file is corrupt: re-save the adapter")
    return AdapterInfo(folder, config, weights_file, tensors, tuple(keys), _training_tokenizer(folder, base_folder, trainer_folder), tuple(warnings))


def _training_tokenizer(folder: Path, base_folder: Path | None, trainer_folder: Path | None):
    """The tokenizer saved with the adapter: in its folder, or for a named adapter (DIR/sft/, see
    sources.named_adapter_folder, which sets ``trainer_folder`` to DIR) in DIR, where the trainer
    saved it. Never another parent folder: a tokenizer that merely sits above an adapter is not its."""
    facts = read_tokenizer_facts(folder, base_folder)
    if facts is None and trainer_folder is not None:
        facts = read_tokenizer_facts(trainer_folder, base_folder)
        if facts is not None:
            log.info("%s: using the tokenizer saved beside it in %s", folder, trainer_folder)
    return facts
