"""Read a base model folder into CheckpointInfo: config, shard files and tensor headers."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError, InputNotFoundError
from .inputs import confined, input_files, read_json, short
from .keys import BIN_INDEX, BIN_SINGLE, CONFIG, GENERATION_CONFIG, SAFE_INDEX, SAFE_SINGLE
from .tensors import TORCH_NAMES, TensorMeta, read_safetensors_header, read_torch_bin_metas
from .tokenizer_facts import TokenizerFacts, read_tokenizer_facts

TEXT_CONFIG_KEYS = ("text_config", "llm_config", "language_config")


@dataclass(frozen=True)
class CheckpointInfo:
    folder: Path
    config: dict[str, Any]
    format: str  # "safetensors" or "bin"
    files: tuple[str, ...]
    tensors: dict[str, TensorMeta]
    tokenizer: TokenizerFacts | None
    has_generation_config: bool
    index_metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def text_config_key(self) -> str | None:
        return next((k for k in TEXT_CONFIG_KEYS if isinstance(self.config.get(k), dict)), None)

    @property
    def text_config(self) -> dict[str, Any]:
        key = self.text_config_key
        return self.config[key] if key else self.config

    @property
    def architecture(self) -> str | None:
        archs = self.config.get("architectures") or []
        return archs[0] if archs else None

    @property
    def dtype(self) -> str:
        """The torch dtype name most floating tensors are stored in."""
        counts = Counter(t.dtype for t in self.tensors.values() if t.dtype in TORCH_NAMES)
        if counts:
            return TORCH_NAMES[counts.most_common(1)[0][0]]
        return str(self.config.get("dtype") or self.config.get("torch_dtype") or "float32")

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def declared_tie(self) -> bool:
        """tie_word_embeddings as transformers would read it (top level, then text_config)."""
        if "tie_word_embeddings" in self.config:
            return bool(self.config["tie_word_embeddings"])
        text = self.text_config
        if text is not self.config and "tie_word_embeddings" in text:
            return bool(text["tie_word_embeddings"])
        return True  # PretrainedConfig's default

    def vocab_size_fields(self) -> dict[str, int]:
        """Every place the config stores the vocabulary size, by dotted path."""
        found = {}
        if isinstance(self.config.get("vocab_size"), int):
            found["vocab_size"] = self.config["vocab_size"]
        key = self.text_config_key
        if key and isinstance(self.config[key].get("vocab_size"), int):
            found[f"{key}.vocab_size"] = self.config[key]["vocab_size"]
        return found


# counts the meta model is built with, one module per unit: a crafted 10**9 would take hours
_COUNT_LIMITS = {"num_hidden_layers": 4096, "n_layer": 4096, "num_layers": 4096, "n_layers": 4096,
                 "num_local_experts": 65536, "num_experts": 65536, "n_routed_experts": 65536}


def check_config_fields(config: dict, path: Path) -> None:
    """The config fields merger and transformers use have the types transformers writes, and the
    counts a model is built from are ones a real model has."""
    expected = {"architectures": (list, "a list of class names"), "auto_map": (dict, "a mapping"),
                "model_type": (str, "a string")}
    for key, (kind, what) in expected.items():
        value = config.get(key)
        if value is not None and (not isinstance(value, kind) or (kind is list and not all(isinstance(v, str) for v in value))):
            raise CheckpointError(f"{path}: {key} is {short(value)} but transformers writes {what} there; fix or re-download it")
    levels = [config] + [config[k] for k in TEXT_CONFIG_KEYS if isinstance(config.get(k), dict)]
    for level in levels:
        for key, limit in _COUNT_LIMITS.items():
            value = level.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= limit:
                raise CheckpointError(f"{path}: {key} is {short(value)}, beyond any real model (at most {limit}); "
                                      "the config is corrupt or crafted: re-download it")


def _read_json(path: Path, what: str) -> Any:
    return read_json(path, what, CheckpointError)


def _shard_files(folder: Path) -> tuple[str, list[str], dict]:
    for index_name, fmt in ((SAFE_INDEX, "safetensors"), (BIN_INDEX, "bin")):
        index_path = folder / index_name
        if index_path.is_file():
            index = _read_json(index_path, "shard index")
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path}: has no weight_map; re-download the index")
            odd = next((v for v in weight_map.values() if not isinstance(v, str)), None)
            if odd is not None:
                raise CheckpointError(f"{index_path}: weight_map names the file {short(odd)}, not a file name; re-download the index")
            files = sorted(set(weight_map.values()))
            for name in files:
                confined(folder, name, f"{index_name} of", CheckpointError)
            missing = [f for f in files if not (folder / f).is_file()]
            if missing:
                raise CheckpointError(
                    f"{folder}: {index_name} lists {len(files)} shards but {len(missing)} are missing "
                    f"({', '.join(missing[:3])}); download the complete checkpoint"
                )
            return fmt, files, index
    for single, fmt in ((SAFE_SINGLE, "safetensors"), (BIN_SINGLE, "bin")):
        if (folder / single).is_file():
            confined(folder, single, "base model folder", CheckpointError)
            return fmt, [single], {}
    found = [p.name for p in input_files(folder, "base model folder", CheckpointError, "*.safetensors")]
    if found:
        return "safetensors", found, {}
    raise CheckpointError(f"{folder}: no model weights (model.safetensors, a shard index or pytorch_model.bin); download the base model's weights")


def inspect_checkpoint_folder(folder: str | Path) -> CheckpointInfo:
    folder = Path(folder)
    if not folder.exists():
        raise InputNotFoundError(f"base model folder {folder}: does not exist; pass a local model folder or a Hub id")
    config_path = folder / CONFIG
    if config_path.is_file() or config_path.is_symlink():
        confined(folder, CONFIG, "base model folder", CheckpointError)
    if not config_path.is_file():
        hint = " (it has adapter_config.json: did you swap --base and --adapter?)" if (folder / "adapter_config.json").is_file() else ""
        raise CheckpointError(f"{folder}: no config.json{hint}; pass the base model's folder")
    config = _read_json(config_path, "config")
    if not isinstance(config, dict) or not ("model_type" in config or "architectures" in config):
        raise CheckpointError(f"{config_path}: has neither model_type nor architectures; it is not a transformers config")
    check_config_fields(config, config_path)
    fmt, files, index = _shard_files(folder)
    tensors: dict[str, TensorMeta] = {}
    for name in files:
        path = folder / name
        metas = read_safetensors_header(path, name=name) if fmt == "safetensors" else read_torch_bin_metas(path, name=name)
        twice = sorted(set(metas) & set(tensors))
        if twice:
            raise CheckpointError(f"{folder}: tensor {short(twice[0])} is in both {tensors[twice[0]].file} and {name}; "
                                  "the checkpoint is corrupt or mixes two saves: re-download it")
        tensors.update(metas)
    if index:
        listed = set(index["weight_map"])
        absent = sorted(listed - set(tensors))
        if absent:
            raise CheckpointError(f"{folder}: the shard index lists {len(absent)} tensors the shards do not hold ({', '.join(absent[:3])}); the checkpoint is incomplete")
    return CheckpointInfo(
        folder=folder,
        config=config,
        format=fmt,
        files=tuple(files),
        tensors=tensors,
        tokenizer=read_tokenizer_facts(folder),
        has_generation_config=(folder / GENERATION_CONFIG).is_file(),
        index_metadata=index.get("metadata") if isinstance(index.get("metadata"), dict) else {},
    )
