"""Adapters saved by older PEFT or transformers versions: each known drift is handled (and said)
or refused by name, with the adapter built the way that version saved it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

FP32_TOL = 1e-5


def old_vlm_names(adapter_dir, target):
    """``adapter_dir`` as transformers < 4.52 saved it for LLaVA: the language model under
    ``language_model.model``, its head under ``language_model.lm_head`` (ms-swift #4697)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter_dir, target)
    renames = (("base_model.model.model.language_model.", "base_model.model.language_model.model."),
               ("base_model.model.lm_head.", "base_model.model.language_model.lm_head."),
               ("base_model.model.model.vision_tower.", "base_model.model.vision_tower.vision_model."),
               ("base_model.model.model.multi_modal_projector.", "base_model.model.multi_modal_projector."))
    weights = load_file(target / "adapter_model.safetensors")
    old = {}
    for key, value in weights.items():
        for new_prefix, old_prefix in renames:
            if key.startswith(new_prefix):
                key = old_prefix + key[len(new_prefix):]
                break
        old[key] = value
    assert set(old) != set(weights)
    save_file(old, target / "adapter_model.safetensors")
    config = json.loads((target / "adapter_config.json").read_text())
    config["target_modules"] = r"^language_model\.model\.layers\.\d+\.self_attn\.(q_proj|v_proj)"  # ms-swift writes a regex
    config.pop("peft_version", None)
    (target / "adapter_config.json").write_text(json.dumps(config))
    return target


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["stream", "peft"])
def test_vlm_adapter_with_pre_4_52_module_names_is_mapped(scenario_cache, tmp_path, engine):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    from merger import inspect_adapter, merge_adapter

    scenario = scenario_cache("llava_text_config")
    adapter = old_vlm_names(scenario.adapter_dir, tmp_path / "old-adapter")
    plan = inspect_adapter(scenario.base_dir, adapter)
    assert not plan.problems, plan.problems
    note = next(n for n in plan.notes if "older transformers" in n)
    assert "8 adapter modules" in note and "language_model.lm_head is now lm_head" in note  # 4 language, 2 vision, embedding, head
    out = tmp_path / "out"
    result = merge_adapter(scenario.base_dir, adapter, out, engine=engine, validate="full", quiet=True)
    assert result.validation.ok, result.validation.findings
    ids = torch.tensor([[1, 4, 9, 20] + scenario.new_token_ids[-1:]])
    with torch.no_grad():
        base = LlavaForConditionalGeneration.from_pretrained(scenario.base_dir)
        base.resize_token_embeddings(scenario.expect_embed_rows)
        truth = PeftModel.from_pretrained(base, scenario.adapter_dir).eval()(input_ids=ids).logits
        got = LlavaForConditionalGeneration.from_pretrained(out).eval()(input_ids=ids).logits
    assert ((got - truth).abs().max() / truth.abs().max()).item() < FP32_TOL


# ------------------------------------------------ LoRA on stacked experts saved by PEFT < 0.19.1


def build_expert_lora(root, moe_intermediate: int = 24):
    """A tiny Qwen3-MoE (fused experts, transformers 5) and a LoRA on its expert parameters, saved by
    today's PEFT; returns the probe ids and the trained model's logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from .factories import make_tokenizer, perturb_trainable

    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=moe_intermediate,
                            num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8, decoder_sparse_step=1, mlp_only_layers=[])
    Qwen3MoeForCausalLM(config).save_pretrained(root / "base")
    make_tokenizer(64).save_pretrained(root / "base")
    model = Qwen3MoeForCausalLM.from_pretrained(root / "base")
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                  target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    perturb_trainable(peft_model, seed=1, scale=0.1)
    ids = torch.tensor([[1, 5, 9, 17, 33, 60]])
    with torch.no_grad():
        truth = peft_model.eval()(input_ids=ids).logits
    peft_model.save_pretrained(root / "adapter")
    return ids, truth


def as_saved_by(adapter_dir, target, version: str | None):
    """The adapter as PEFT ``version`` (< 0.19.1) saved it: expert pairs in the other orientation.
    The regrouping was checked against PEFT 0.18.0 and 0.19.0 themselves (their saves, loaded
    regrouped by today's PEFT, give their trained logits exactly); it is its own inverse."""
    from safetensors.torch import load_file, save_file

    from merger.drift import regroup_expert_pair

    shutil.copytree(adapter_dir, target)
    weights = load_file(target / "adapter_model.safetensors")
    for key in [k for k in weights if "experts" in k and "lora_A" in k]:
        b_key = key.replace("lora_A", "lora_B")
        weights[key], weights[b_key] = regroup_expert_pair(weights[key], weights[b_key], experts=4)
    save_file(weights, target / "adapter_model.safetensors")
    config = json.loads((target / "adapter_config.json").read_text())
    if version:
        config["peft_version"] = version
    else:
        config.pop("peft_version", None)
    (target / "adapter_config.json").write_text(json.dumps(config))
    return target


@pytest.mark.slow
@pytest.mark.parametrize("version", ["0.19.0", "0.18.1", None])
def test_expert_lora_in_the_old_orientation_is_regrouped(tmp_path, version):
    from transformers import Qwen3MoeForCausalLM

    from merger import merge_adapter

    ids, truth = build_expert_lora(tmp_path)
    old = as_saved_by(tmp_path / "adapter", tmp_path / "old", version)
    out = tmp_path / "out"
    result = merge_adapter(tmp_path / "base", old, out, validate="full", quiet=True)
    assert result.validation.ok, result.validation.findings
    note = next(n for n in result.plan.notes if "peft #3165" in n)
    assert "regrouped into today's orientation" in note and "4 stacked expert parameters" in note
    with torch.no_grad():
        got = Qwen3MoeForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
    assert ((got - truth).abs().max() / truth.abs().max()).item() < FP32_TOL
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_todays_orientation_is_left_alone(tmp_path):
    from merger import inspect_adapter

    build_expert_lora(tmp_path)
    plan = inspect_adapter(tmp_path / "base", tmp_path / "adapter")
    assert not plan.problems and not any("peft #3165" in n for n in plan.notes)


def test_square_experts_from_an_old_peft_are_refused(tmp_path, capsys):
    from merger.cli import main

    build_expert_lora(tmp_path, moe_intermediate=16)  # gate_up_proj (4, 32, 32): both orientations fit
    old = as_saved_by(tmp_path / "adapter", tmp_path / "old", "0.19.0")
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["--base", str(tmp_path / "base"), "--adapter", str(old), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "peft_version 0.19.0" in err and "peft #3165" in err and "square" in err and err.count("\n") == 1, err
    assert not out.exists()


# ------------------------------------------- Gemma 3's scaled embedding trained by PEFT < 0.18


def build_gemma3_old_peft(root, kind: str, version: str | None):
    """A tiny Gemma 3 and an adapter trained as PEFT < 0.18 trained it: its layers did not apply the
    embedding's sqrt(hidden) factor (peft #2809). Emulated by hiding the factor from today's PEFT;
    checked against PEFT 0.17.1 itself (its saved adapters and trained logits match exactly)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from merger.engines.peft import emulate_unscaled_embedding

    from .factories import make_tokenizer, perturb_trainable

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=8)
    Gemma3ForCausalLM(config).save_pretrained(root / "base")
    make_tokenizer(64).save_pretrained(root / "base")
    model = Gemma3ForCausalLM.from_pretrained(root / "base")
    lora = (LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]) if kind == "lora" else
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices=[3, 7, 60]))
    peft_model = get_peft_model(model, lora)
    perturb_trainable(peft_model, seed=1, scale=0.1)
    peft_model.eval()
    ids = torch.tensor([[1, 3, 7, 9, 17, 33, 60]])
    with torch.no_grad():
        today = peft_model(input_ids=ids).logits
        emulate_unscaled_embedding(peft_model)
        trained = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(root / "adapter")
    config = json.loads((root / "adapter" / "adapter_config.json").read_text())
    if version:
        config["peft_version"] = version
    else:
        config.pop("peft_version", None)
    (root / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    assert (today - trained).abs().max() > 1e-2 * trained.abs().max()  # the drift matters in this scenario
    return ids, trained


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "tokens"])
def test_gemma3_adapters_of_peft_before_0_18_merge_as_trained(tmp_path, kind):
    from transformers import Gemma3ForCausalLM

    from merger import merge_adapter

    ids, trained = build_gemma3_old_peft(tmp_path, kind, "0.17.1")
    out = tmp_path / "out"
    result = merge_adapter(tmp_path / "base", tmp_path / "adapter", out, validate="full", quiet=True)
    assert result.engine == "stream" and result.validation.ok, result.validation.findings
    assert any("peft #2809/#2825" in n for n in result.plan.notes)
    assert result.plan.tie_word_embeddings is False  # both untie: LoRA on the embedding, and tokens by the drift
    with torch.no_grad():
        got = Gemma3ForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
    assert ((got - trained).abs().max() / trained.abs().max()).item() < FP32_TOL


def test_gemma3_drift_refuses_the_peft_engine(tmp_path, capsys):
    from merger.cli import main

    build_gemma3_old_peft(tmp_path, "tokens", None)
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--out", str(out), "--engine", "peft"]) == 2
    err = capsys.readouterr().err
    assert "--engine peft cannot run this merge" in err and "PEFT < 0.18" in err and err.count("\n") == 1, err


def test_gemma3_adapters_of_peft_0_18_are_not_touched(tmp_path):
    from merger import inspect_adapter

    build_gemma3_old_peft(tmp_path, "lora", "0.18.0")
    plan = inspect_adapter(tmp_path / "base", tmp_path / "adapter")
    assert plan.embedding_drift is None and not any("peft #2809" in n for n in plan.notes)
