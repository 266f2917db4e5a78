"""Read a base model folder into CheckpointInfo: config, shard files and tensor headers.

A base stored quantized in a format merger dequantizes (block-FP8 or per-tensor FP8 with
``quant_method: fp8``, MXFP4 with ``quant_method: mxfp4``) is described as the model transformers
loads from it with ``dequantize=True``: ``tensors`` holds the logical tensors (names and shapes of the
dequantized model, BF16), and ``quantized`` keeps what reading the stored ones takes (quantized.py's
recipe per tensor and the headers as they are).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError, InputNotFoundError
from .inputs import confined, input_files, read_json, short
from .keys import BIN_INDEX, BIN_SINGLE, CONFIG, GENERATION_CONFIG, SAFE_INDEX, SAFE_SINGLE
from .quantized import (
    FLOAT8_TAGS,
    RECIPE_FP8_BLOCK,
    RECIPE_FP8_TENSOR,
    RECIPE_PLAIN,
    LogicalTensor,
    QuantizedFormatError,
    quantized_tensor_map,
)
from .tensors import TORCH_NAMES, TensorMeta, read_safetensors_header, read_torch_bin_metas
from .tokenizer_facts import TokenizerFacts, read_tokenizer_facts

TEXT_CONFIG_KEYS = ("text_config", "llm_config", "language_config")
DEQUANTIZED_METHODS = ("fp8", "mxfp4")  # quant_method values merger dequantizes (quantized.py)
# what a dequantized base is merged and written in (transformers' dequantize=True loads it so)
DEQUANTIZED_DTYPE = "bfloat16"
DEQUANTIZED_TAG = "BF16"


@dataclass(frozen=True)
class QuantizedBase:
    """How a quantized base's stored tensors make the dequantized model merger plans on.

    ``logical`` maps every tensor of the dequantized model (plain ones included) to its recipe and the
    stored tensors it reads; ``stored`` is the headers as they are (what a reader opens). ``problem``
    is set, and ``logical`` empty, when the files cannot be dequantized as they are (a scale without
    its weight, a grid that does not fit): the plan refuses the base with it.
    """

    method: str  # quant_method: "fp8" or "mxfp4" ("" when float8 tensors come without a quantization_config)
    logical: dict[str, LogicalTensor]
    stored: dict[str, TensorMeta]
    problem: str | None = None

    @property
    def dequantized(self) -> list[str]:
        """The logical tensors computed from quantized values (the rest are stored as they are)."""
        return [name for name, entry in self.logical.items() if entry.recipe != RECIPE_PLAIN]

    @property
    def description(self) -> str:
        """The format in words: 'block-FP8 (128x128 blocks)', 'per-tensor FP8', 'MXFP4 (...)'."""
        recipes = {entry.recipe: entry for entry in self.logical.values() if entry.recipe != RECIPE_PLAIN}
        if RECIPE_FP8_BLOCK in recipes:
            rows, cols = recipes[RECIPE_FP8_BLOCK].block_size
            return f"block-FP8 ({rows}x{cols} blocks)"
        if RECIPE_FP8_TENSOR in recipes:
            return "per-tensor FP8"
        if self.method == "mxfp4":
            return "MXFP4 (FP4 values in groups of 32 sharing an E8M0 scale)"
        return f"{self.method or 'float8'} (no quantized tensors found)"

    @property
    def partial_blocks(self) -> list[str]:
        """Block-FP8 tensors with a partial last row or column of blocks (576 rows in 128-row blocks).

        transformers 5 dequantizes on load with the block derived from the scale grid (rows // grid
        rows), which refuses such a tensor or cuts it into wrong blocks; merger reads them by the
        format's definition, and its PEFT engine then loads merger's values (dequant_source.py).
        """
        found = []
        for name, entry in self.logical.items():
            if entry.recipe == RECIPE_FP8_BLOCK and any(
                    dim > side and dim % side for dim, side in zip(entry.shape[-2:], entry.block_size, strict=True)):
                found.append(name)
        return found


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
    # a base stored block-FP8 / FP8 / MXFP4: ``tensors`` are then the dequantized model's (see QuantizedBase)
    quantized: QuantizedBase | None = None

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
    def quantization_config(self) -> dict[str, Any] | None:
        """config.json's quantization_config (top level, else the text config's), as transformers reads it."""
        return quantization_config_of(self.config)

    @property
    def dtype(self) -> str:
        """The torch dtype name most floating tensors are stored in; bfloat16 for a dequantized base."""
        if self.quantized is not None:
            return DEQUANTIZED_DTYPE  # never float8: the dequantized values are what is merged and written
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


def quantization_config_of(config: dict[str, Any]) -> Any:
    """quantization_config at the top level, else in the text config (Mistral 3's text_config carries it)."""
    quant = config.get("quantization_config")
    if quant:
        return quant
    for key in TEXT_CONFIG_KEYS:
        if isinstance(config.get(key), dict) and config[key].get("quantization_config"):
            return config[key]["quantization_config"]
    return None


def dequantized_view(config: dict[str, Any], fmt: str, tensors: dict[str, TensorMeta]) -> QuantizedBase | None:
    """The dequantized model's view of a quantized base's tensors, or None for a base merger reads as stored.

    Bases with quant_method fp8 or mxfp4, and any base holding float8 tensors (which without a
    quantization_config have no scales to read them by), are described; other quantization methods
    are left to the planner, which refuses them.
    """
    quant = quantization_config_of(config)
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    float8 = any(meta.dtype in FLOAT8_TAGS for meta in tensors.values())
    if method not in DEQUANTIZED_METHODS and not (quant is None and float8):
        return None
    method = str(method or "")
    try:
        logical = quantized_tensor_map({"quantization_config": quant} if quant else {}, tensors)
    except QuantizedFormatError as exc:
        return QuantizedBase(method, {}, tensors, str(exc))
    if fmt != "safetensors":  # the readers address stored rows by byte offset
        return QuantizedBase(method, {}, tensors, f"a {method} checkpoint stored as pytorch_model.bin, expected "
                             "safetensors (as FP8 and MXFP4 models ship): convert it to safetensors or download those")
    return QuantizedBase(method, logical, tensors)


def logical_metas(view: QuantizedBase) -> dict[str, TensorMeta]:
    """What the planner sees: stored metas for plain tensors; for dequantized ones the logical shape, the
    output dtype, and the file of the data they are read from (offset -1: not a stored tensor's bytes)."""
    metas = {}
    for name, entry in view.logical.items():
        if entry.recipe == RECIPE_PLAIN:
            metas[name] = view.stored[name]
        else:
            metas[name] = TensorMeta(name, entry.shape, DEQUANTIZED_TAG, view.stored[entry.sources[0]].file)
    return metas


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
    quantized = dequantized_view(config, fmt, tensors)
    return CheckpointInfo(
        folder=folder,
        config=config,
        format=fmt,
        files=tuple(files),
        tensors=logical_metas(quantized) if quantized is not None and quantized.problem is None else tensors,
        tokenizer=read_tokenizer_facts(folder),
        has_generation_config=(folder / GENERATION_CONFIG).is_file(),
        index_metadata=index.get("metadata") if isinstance(index.get("metadata"), dict) else {},
        quantized=quantized,
    )
