"""Adapter key layouts PEFT writes, and the options object's rules."""

import pytest

from merger.errors import OptionsError
from merger.keys import parse_adapter_key
from merger.options import MergeOptions, parse_size


@pytest.mark.parametrize(
    "key, module, role",
    [
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "model.layers.0.self_attn.q_proj", "lora_A"),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", "model.layers.0.self_attn.q_proj", "lora_B"),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", "model.layers.0.self_attn.q_proj", "lora_A"),
        ("base_model.model.model.embed_tokens.lora_embedding_A", "model.embed_tokens", "lora_embedding_A"),
        ("base_model.model.model.embed_tokens.weight", "model.embed_tokens", "full_weight"),
        ("base_model.model.lm_head.modules_to_save.weight", "lm_head", "full_weight"),
        ("base_model.model.lm_head.modules_to_save.default.weight", "lm_head", "full_weight"),
        ("base_model.model.lm_head.original_module.weight", "lm_head", "original_weight"),
        ("base_model.model.model.embed_tokens.base_layer.weight", "model.embed_tokens", "full_weight"),
        ("base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta", "model.embed_tokens", "trainable_tokens"),
        ("base_model.model.lm_head.trainable_tokens_delta", "lm_head", "trainable_tokens"),
        ("base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector", "model.layers.0.mlp.up_proj", "lora_magnitude"),
        ("base_model.model.score.weight", "score", "full_weight"),
    ],
)
def test_parse_adapter_key(key, module, role):
    parsed = parse_adapter_key(key)
    assert (parsed.module, parsed.role) == (module, role)


def test_unknown_layout_is_none():
    assert parse_adapter_key("base_model.model.vblora_vector_bank") is None


def test_sizes():
    assert parse_size("5GB") == 5_000_000_000
    assert parse_size("500MiB") == 500 * 1024**2
    with pytest.raises(OptionsError, match="not a size"):
        parse_size("big")


def test_unknown_option_is_named():
    with pytest.raises(OptionsError, match=r"unknown option 'colour'"):
        MergeOptions.from_mapping({"colour": "red"})


def test_bad_choice_is_named():
    with pytest.raises(OptionsError, match=r"option engine: 'fast' is not one of auto, stream, peft"):
        MergeOptions(engine="fast")


def test_dashes_accepted_like_the_cli():
    assert MergeOptions.from_mapping({"max-shard-size": "1GB"}).max_shard_size == "1GB"


@pytest.mark.parametrize(("name", "full"), [
    ("unsloth/llama-3-8b-bnb-4bit", "unsloth/llama-3-8b"),
    ("unsloth/Llama-3.2-1B-Instruct-bnb-4bit", "unsloth/Llama-3.2-1B-Instruct"),
    ("TheBloke/Llama-2-7B-GPTQ", "TheBloke/Llama-2-7B"),
    ("Qwen/Qwen2-7B-Instruct-AWQ", "Qwen/Qwen2-7B-Instruct"),
    ("meta-llama/Llama-2-7b-hf", None),
])
def test_full_precision_name_of_a_quantized_upload(name, full):
    from merger.keys import full_precision_name

    assert full_precision_name(name) == full
