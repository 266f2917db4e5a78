"""Every PEFT type merger merges besides LoRA: merged by PEFT on the peft engine, with merger's
resizing, accounting and report, proven by the logits of base + unmerged adapter."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from merger.peft_types import CANNOT_MERGE, MERGED_BY_PEFT

from .factories import EMBED_AND_HEAD, llama_config, make_tokenizer, perturb_trainable

FP32_TOL = 1e-5  # merged vs unmerged in fp32: the same products in another order
PROBE = torch.tensor([[1, 5, 9, 17, 33, 60, 63, 2]])
ATTN = ["q_proj", "v_proj"]

# a config per type that fits the tiny Llama (hidden 32, q 32x32, v 16x32)
CONFIGS = {
    "ADALORA": dict(target_modules=ATTN, total_step=10, init_r=4, target_r=2),
    "BOFT": dict(target_modules=ATTN, boft_block_size=4),
    "C3A": dict(target_modules=ATTN, block_size=8),
    "DELORA": dict(target_modules=ATTN, r=4),
    "FOURIERFT": dict(target_modules=ATTN, n_frequency=64),
    "GRALORA": dict(target_modules=ATTN, r=4, gralora_k=2),
    "HRA": dict(target_modules=ATTN, r=4),
    "IA3": dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "LN_TUNING": dict(target_modules=["input_layernorm", "post_attention_layernorm"]),
    "LOHA": dict(target_modules=ATTN, r=4, alpha=8),
    "LOKR": dict(target_modules=ATTN, r=4, alpha=8),
    "MISS": dict(target_modules=ATTN, r=8),
    "OFT": dict(target_modules=ATTN, r=0, oft_block_size=8),
    "RANDLORA": dict(target_modules=ATTN, r=4),
    "ROAD": dict(target_modules=ATTN, group_size=8),
    "SHIRA": dict(target_modules=ATTN, r=2),
    "VBLORA": dict(target_modules=ATTN, vector_length=8, num_vectors=16, r=2),
    "VERA": dict(target_modules=ATTN, r=4),
    "WAVEFT": dict(target_modules=ATTN, n_frequency=64),
}


def build(root, peft_type: str, added: int = 0, modules_to_save=None):
    """A saved base, and an adapter of ``peft_type`` trained on it (resized first when tokens are added)."""
    from peft import get_peft_model
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(llama_config(64)).save_pretrained(root / "base")
    make_tokenizer(64).save_pretrained(root / "base")
    model = LlamaForCausalLM.from_pretrained(root / "base")
    tok = AutoTokenizer.from_pretrained(root / "base")
    if added:
        tok.add_tokens([f"<t{i}>" for i in range(added)], special_tokens=True)
        model.resize_token_embeddings(len(tok), pad_to_multiple_of=8, mean_resizing=False)
    config = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type](**CONFIGS[peft_type], **({"modules_to_save": modules_to_save} if modules_to_save else {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, config)
        perturb_trainable(peft_model, seed=1, scale=0.2)
        peft_model.eval()
        ids = torch.tensor([list(PROBE[0]) + list(range(64, 64 + added))])
        with torch.no_grad():
            truth = peft_model(input_ids=ids).logits
            with peft_model.disable_adapter():
                untouched = peft_model(input_ids=ids).logits
        peft_model.save_pretrained(root / "adapter")
        if added:
            tok.save_pretrained(root / "adapter")
    # a scenario where the adapter changes nothing would prove nothing
    assert (truth - untouched).abs().max() > 1e-3 * truth.abs().max(), f"{peft_type}: the trained adapter has no effect"
    return ids, truth


def merged_logits(out, ids):
    from transformers import LlamaForCausalLM

    with torch.no_grad():
        return LlamaForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits


def test_the_prefixes_are_peft_own():
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING
    from peft.utils import PeftType

    for peft_type, prefix in MERGED_BY_PEFT.items():
        assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType(peft_type)] == prefix, peft_type


@pytest.mark.slow
@pytest.mark.parametrize("peft_type", sorted(MERGED_BY_PEFT))
def test_each_type_merges_to_the_unmerged_model(peft_type, tmp_path):
    from merger import merge_adapter

    ids, truth = build(tmp_path, peft_type)
    out = tmp_path / "out"
    result = merge_adapter(tmp_path / "base", tmp_path / "adapter", out, quiet=True)
    assert result.engine == "peft" and "merged by PEFT itself" in result.engine_reason
    assert result.validation.mode == "full" and result.validation.metrics["logits_checked"], result.validation.checks
    got = merged_logits(out, ids)
    err = ((got - truth).abs().max() / truth.abs().max()).item()
    assert err < FP32_TOL, (peft_type, err)
    report = json.loads((out / "merge_report.json").read_text())
    assert report["plan"]["peft_type"] == peft_type and report["plan"]["modules_merged_by_peft"] >= 2


@pytest.mark.slow
def test_a_resized_vocabulary_with_another_type(tmp_path):
    from merger import merge_adapter

    ids, truth = build(tmp_path, "LOHA", added=3, modules_to_save=EMBED_AND_HEAD)
    out = tmp_path / "out"
    result = merge_adapter(tmp_path / "base", tmp_path / "adapter", out, quiet=True)
    assert result.plan.embed.rows == 72 and result.plan.embed.base_rows == 64
    got = merged_logits(out, ids)
    assert got.shape == truth.shape
    assert ((got - truth).abs().max() / truth.abs().max()).item() < FP32_TOL


def test_stream_is_refused_for_them_with_the_reason(tmp_path, capsys):
    from merger.cli import main

    build(tmp_path, "IA3")
    capsys.readouterr()  # the build's save progress bars
    out = tmp_path / "out"
    assert main(["--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--out", str(out), "--engine", "stream"]) == 2
    err = capsys.readouterr().err
    assert "peft_type IA3 is merged by PEFT itself" in err and err.count("\n") == 1
    assert not out.exists()


def test_an_unplaceable_tensor_of_another_type_is_refused(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from merger.cli import main

    build(tmp_path, "LOHA")
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    weights["base_model.model.model.layers.0.self_attn.nonexistent.hada_w1_a"] = torch.zeros(4, 32)
    save_file(weights, tmp_path / "adapter" / "adapter_model.safetensors")
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "do not exist in the base" in err and "self_attn.nonexistent" in err and err.count("\n") == 1


@pytest.mark.parametrize("peft_type, fragment", [(t, "cannot be merged into plain weights") for t in sorted(CANNOT_MERGE)]
                         + [("BONE", "renamed Bone to MiSS"), ("FUTURE_TUNER", "not one merger has proven it merges")])
def test_types_that_cannot_merge_are_refused_by_name(copies, tmp_path, capsys, peft_type, fragment):
    from merger.cli import main

    base, adapter = copies
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["peft_type"] = peft_type
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert main(["--base", str(base), "--adapter", str(adapter), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"peft_type {peft_type}" in err and fragment in err and err.count("\n") == 1, err
    assert not out.exists()
