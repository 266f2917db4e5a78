"""The fixtures themselves: every scenario builds, its adapter is non-trivial, the reference runs, and
the resized-vocabulary adapters fail on the un-resized base exactly as they do for users."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from .factories import (
    SCENARIOS,
    model_class,
    reference_logits,
    sample_input_ids,
    trained_vocab_columns,
)

NAMES = list(SCENARIOS)
RESIZED = ["llama_untied_plus3", "autotrain_pad16", "llamafactory_pad64", "medicalgpt_extended", "tied_diverged",
           "tied_still_tied", "tied_embed_only_trained", "lora_on_embed_and_head", "trainable_tokens_untied",
           "trainable_tokens_tied", "llava_text_config", "gpt2_conv1d", "bf16_sharded", "phi_head_bias", "dora_on_embedding"]
P = "base_model.model."


def adapter_tensors(scenario) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(scenario.adapter_dir / "adapter_model.safetensors"))


def test_resized_list_matches_the_scenarios(scenario_cache):
    resized = [n for n in NAMES if scenario_cache(n).expect_embed_rows != scenario_cache(n).base_rows]
    assert resized == RESIZED


@pytest.mark.parametrize("scenario", NAMES, indirect=True)
def test_scenario_builds(scenario):
    from transformers import AutoTokenizer

    sc = scenario
    assert (sc.base_dir / "config.json").is_file() and list(sc.base_dir.glob("*.safetensors"))
    assert (sc.adapter_dir / "adapter_config.json").is_file()
    assert (sc.adapter_dir / "adapter_model.safetensors").is_file()
    assert sc.expect_head_rows == sc.expect_embed_rows >= sc.base_rows > 0
    assert len(AutoTokenizer.from_pretrained(sc.base_dir)) == sc.base_tokenizer_len

    config = json.loads((sc.base_dir / "config.json").read_text())
    text = config.get("text_config", config)
    assert text["vocab_size"] == sc.base_rows
    assert ("text_config" in config) is sc.multimodal

    adapter_config = json.loads((sc.adapter_dir / "adapter_config.json").read_text())
    # users load the base from its folder; PEFT records it and its auto-save depends on it
    assert adapter_config["base_model_name_or_path"] == str(sc.base_dir)

    if sc.new_token_ids:
        tok = AutoTokenizer.from_pretrained(sc.adapter_dir)
        assert len(tok) == sc.tokenizer_len == sc.base_tokenizer_len + len(sc.new_token_ids)
        assert sc.new_token_ids == list(range(sc.base_tokenizer_len, sc.tokenizer_len))
        assert max(sc.new_token_ids) < sc.expect_embed_rows
        assert tok.chat_template == sc.chat_template
        if sc.pad_to_multiple_of:
            assert sc.expect_embed_rows % sc.pad_to_multiple_of == 0 and sc.expect_embed_rows > sc.tokenizer_len
    else:
        assert sc.tokenizer_len is None and not (sc.adapter_dir / "tokenizer.json").exists()

    # "trained": no LoRA B left at its zero init, and the shapes the saved keys report are real
    tensors = adapter_tensors(sc)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == sc.adapter_keys
    b_keys = [k for k in tensors if "lora_B" in k or "lora_embedding_B" in k]
    assert b_keys and all(tensors[k].abs().sum() > 0 for k in b_keys)


def test_at_least_one_chat_template(scenario_cache):
    assert [n for n in NAMES if scenario_cache(n).chat_template] == ["llama_untied_plus3", "qwen_padded_base"]


@pytest.mark.parametrize("scenario", ["bf16_sharded"], indirect=True)
def test_bf16_base_is_sharded(scenario):
    index = json.loads((scenario.base_dir / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in scenario.base_dir.glob("*.safetensors"))
    assert len(shards) >= 3 and sorted(set(index["weight_map"].values())) == shards
    assert json.loads((scenario.base_dir / "config.json").read_text())["dtype"] == "bfloat16"


def _unmerged_base_logits(sc, ids, dtype):
    """The resized base alone, seeded like the reference: what the adapter must move away from."""
    with torch.random.fork_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1234)
        model = model_class(sc.base_dir).from_pretrained(sc.base_dir, dtype=dtype).eval()
        if model.get_input_embeddings().weight.shape[0] != sc.expect_embed_rows:
            model.resize_token_embeddings(sc.expect_embed_rows, mean_resizing=False)
        with torch.no_grad():
            return model(input_ids=ids).logits


@pytest.mark.parametrize("scenario", NAMES, indirect=True)
def test_reference_logits(scenario):
    sc = scenario
    ids = sample_input_ids(sc)
    assert ids.shape == (2, 12) and ids.dtype == torch.long
    assert set(sc.new_token_ids) <= set(ids.flatten().tolist())
    assert torch.equal(ids, sample_input_ids(sc))
    cols = trained_vocab_columns(sc)
    assert cols == sorted(set(range(sc.base_rows)) | set(sc.new_token_ids))

    logits = reference_logits(sc, ids, dtype=sc.dtype)
    assert logits.shape == (2, 12, sc.expect_head_rows) and logits.dtype == sc.dtype
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(reference_logits(sc, ids, dtype=sc.dtype), logits, rtol=0, atol=0)
    base = _unmerged_base_logits(sc, ids, sc.dtype)
    moved = (logits[..., cols].float() - base[..., cols].float()).abs().max().item()
    assert moved > 1e-3, f"the adapter barely changes the logits ({moved})"


@pytest.mark.parametrize("scenario", RESIZED, indirect=True)
def test_unresized_base_reproduces_the_users_error(scenario):
    from peft import PeftModel

    sc = scenario
    model = model_class(sc.base_dir).from_pretrained(sc.base_dir)
    assert model.get_input_embeddings().weight.shape[0] == sc.base_rows < sc.expect_embed_rows
    if "trainable_tokens" in sc.name:
        # TrainableTokens indexes the new ids while wrapping the layer, before any weight is loaded
        error, message = IndexError, rf"index {sc.new_token_ids[0]} is out of bounds for dimension 0 with size {sc.base_rows}"
    else:
        error, message = RuntimeError, rf"size mismatch for .*torch.Size\(\[{sc.expect_embed_rows}, "
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error, match=message):
            PeftModel.from_pretrained(model, sc.adapter_dir)


@pytest.mark.parametrize("scenario", ["qwen_padded_base", "no_vocab_change", "dora_rslora"], indirect=True)
def test_unresized_base_loads_when_nothing_grew(scenario):
    from peft import PeftModel

    sc = scenario
    model = model_class(sc.base_dir).from_pretrained(sc.base_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        PeftModel.from_pretrained(model, sc.adapter_dir)
    assert model.get_input_embeddings().weight.shape[0] == sc.expect_embed_rows


# What PEFT 0.21 writes for the embedding layers, pinned so a PEFT upgrade that changes it shows up
# here rather than as a confusing merge failure. With the base loaded from its folder and the vocab
# resized, save_embedding_layers="auto" turns on, and a modules_to_save layer is then written three
# times: X.weight (the trained copy), X.modules_to_save.weight (the same) and X.original_module.weight.
EMBEDDING_KEYS = {
    "tied_diverged": {
        "lm_head.weight": (67, 32), "lm_head.modules_to_save.weight": (67, 32),
        "lm_head.original_module.weight": (67, 32), "model.embed_tokens.weight": (67, 32),
        "model.embed_tokens.modules_to_save.weight": (67, 32), "model.embed_tokens.original_module.weight": (67, 32),
    },
    "tied_still_tied": {"lm_head.weight": (66, 32), "model.embed_tokens.weight": (66, 32)},
    "lora_on_embed_and_head": {
        "lm_head.base_layer.weight": (67, 32), "lm_head.lora_A.weight": (8, 32), "lm_head.lora_B.weight": (67, 8),
        "model.embed_tokens.base_layer.weight": (67, 32), "model.embed_tokens.lora_embedding_A": (8, 67),
        "model.embed_tokens.lora_embedding_B": (32, 8),
    },
    "trainable_tokens_untied": {
        "lm_head.weight": (67, 32), "model.embed_tokens.token_adapter.base_layer.weight": (67, 32),
        "model.embed_tokens.token_adapter.trainable_tokens_delta": (3, 32),
    },
    "trainable_tokens_tied": {
        "lm_head.token_adapter.base_layer.weight": (67, 32), "lm_head.token_adapter.trainable_tokens_delta": (3, 32),
        "model.embed_tokens.token_adapter.base_layer.weight": (67, 32),
        "model.embed_tokens.token_adapter.trainable_tokens_delta": (3, 32),
    },
    "gpt2_conv1d": {
        "lm_head.weight": (66, 32), "lm_head.modules_to_save.weight": (66, 32),
        "lm_head.original_module.weight": (66, 32), "transformer.wte.weight": (66, 32),
        "transformer.wte.modules_to_save.weight": (66, 32), "transformer.wte.original_module.weight": (66, 32),
    },
    "llava_text_config": {"lm_head.weight": (66, 32), "model.language_model.embed_tokens.weight": (66, 32)},
}


@pytest.mark.parametrize("scenario", list(EMBEDDING_KEYS), indirect=True)
def test_embedding_keys_as_peft_writes_them(scenario):
    sc = scenario
    tensors = adapter_tensors(sc)
    embedding = {k[len(P):]: tuple(v.shape) for k, v in tensors.items()
                 if not any(part in k for part in (".layers.", ".h.", "vision_tower", "projector"))}
    assert embedding == EMBEDDING_KEYS[sc.name]

    def t(key):
        return tensors[P + key]

    if sc.name in ("tied_diverged", "gpt2_conv1d"):
        embed = "transformer.wte" if sc.name == "gpt2_conv1d" else "model.embed_tokens"
        for layer in (embed, "lm_head"):
            assert torch.equal(t(f"{layer}.weight"), t(f"{layer}.modules_to_save.weight"))
            assert not torch.equal(t(f"{layer}.weight"), t(f"{layer}.original_module.weight"))
        # the base was tied: both originals are the one shared matrix, the trained copies diverged
        assert torch.equal(t(f"{embed}.original_module.weight"), t("lm_head.original_module.weight"))
        assert not torch.allclose(t(f"{embed}.weight"), t("lm_head.weight"), atol=1e-3)
    if sc.name == "tied_still_tied":
        assert torch.equal(t("model.embed_tokens.weight"), t("lm_head.weight"))
    if sc.name == "trainable_tokens_tied":
        for suffix in ("base_layer.weight", "trainable_tokens_delta"):
            assert torch.equal(t(f"model.embed_tokens.token_adapter.{suffix}"), t(f"lm_head.token_adapter.{suffix}"))
    if sc.name.startswith("trainable_tokens"):
        # the delta holds the new rows' full values (PEFT index_copies it in), not an increment
        from peft import PeftModel

        model = model_class(sc.base_dir).from_pretrained(sc.base_dir)
        model.resize_token_embeddings(sc.expect_embed_rows, mean_resizing=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = PeftModel.from_pretrained(model, sc.adapter_dir)
        with torch.no_grad():
            rows = peft_model.get_input_embeddings()(torch.tensor(sc.new_token_ids))
        torch.testing.assert_close(rows, t("model.embed_tokens.token_adapter.trainable_tokens_delta"), rtol=0, atol=0)
