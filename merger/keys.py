"""Names: how PEFT names adapter tensors, and which files make up checkpoints and tokenizers.

Every key pattern merger understands lives here, so supporting a new layout is a one-place change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PEFT_PREFIX = "base_model.model."

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
ADAPTER_FILES = (ADAPTER_CONFIG, *ADAPTER_WEIGHTS, "README.md", "training_args.bin")

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

# Files that make a tokenizer or processor usable; copied byte for byte.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model",
    "chat_template.json", "chat_template.jinja", "qwen.tiktoken", "tokenizer.tiktoken",
)
PROCESSOR_FILES = (
    "processor_config.json", "preprocessor_config.json", "image_processor_config.json",
    "video_preprocessor_config.json", "feature_extractor_config.json",
)
CHAT_TEMPLATE_DIR = "additional_chat_templates"
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")

# role of an adapter tensor, decided from the end of its key (longest suffixes first)
_ROLE_SUFFIXES = (
    (".token_adapter.trainable_tokens_delta", "trainable_tokens"),
    # the layer under LoRA's trainable tokens, written whole when the vocabulary was resized
    (".token_adapter.base_layer.weight", "full_weight"),
    (".trainable_tokens_delta", "trainable_tokens"),
    (".lora_magnitude_vector.weight", "lora_magnitude"),
    (".lora_magnitude_vector", "lora_magnitude"),
    (".lora_embedding_A", "lora_embedding_A"),
    (".lora_embedding_B", "lora_embedding_B"),
    (".lora_A.weight", "lora_A"),
    (".lora_B.weight", "lora_B"),
    (".lora_B.bias", "lora_B_bias"),
    (".modules_to_save.weight", "full_weight"),
    (".modules_to_save.bias", "full_bias"),
    (".original_module.weight", "original_weight"),
    (".original_module.bias", "original_bias"),
    (".base_layer.weight", "full_weight"),
    (".base_layer.bias", "full_bias"),
    (".weight", "full_weight"),
    (".bias", "full_bias"),
)
_ADAPTER_NAME_INFIX = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector|modules_to_save|trainable_tokens_delta)\.default(?=\.|$)")


@dataclass(frozen=True)
class AdapterKey:
    key: str  # as stored in the adapter file
    module: str  # module path in the model, e.g. "model.layers.0.self_attn.q_proj"
    role: str  # one of the roles in _ROLE_SUFFIXES


def parse_adapter_key(key: str) -> AdapterKey | None:
    """Split a PEFT adapter key into (module path, role); None when the layout is unknown."""
    name = key.removeprefix(PEFT_PREFIX)
    name = _ADAPTER_NAME_INFIX.sub(r".\1", name)  # adapters saved with the adapter name left in
    for suffix, role in _ROLE_SUFFIXES:
        if name.endswith(suffix):
            module = name[: -len(suffix)]
            if module:
                return AdapterKey(key, module, role)
    return None


# the suffixes quantized re-uploads carry: unsloth/llama-3-8b-bnb-4bit, TheBloke/...-GPTQ, ...-AWQ
_QUANTIZED_SUFFIX = re.compile(r"[-_](bnb[-_])?[48]bit$|[-_](gptq|awq)(-int[48])?$", re.IGNORECASE)


def full_precision_name(name: str) -> str | None:
    """The model a quantized re-upload was made from, by its name (None when the name says nothing)."""
    full = _QUANTIZED_SUFFIX.sub("", name)
    return full if full != name else None


def module_leaf(module: str) -> str:
    return module.rsplit(".", 1)[-1]
