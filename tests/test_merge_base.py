"""--merge-base nf4: a QLoRA adapter merged into the base it was trained against, dequant(nf4(W)),
proven against PEFT on that base; and what inspect says about the base an adapter saw."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

FP32_TOL = 1e-5

needs_bitsandbytes = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                        reason='bitsandbytes (>= 0.46, CPU backend) is not installed: pip install "merger[nf4]"')


@needs_bitsandbytes
@pytest.mark.slow
@pytest.mark.parametrize("engine", ["stream", "peft"])
def test_nf4_merge_base_gives_the_model_qlora_trained(scenario_cache, tmp_path, engine):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from merger import merge_adapter
    from merger.engines.peft import with_merge_base
    from merger.quantized import nf4_round_trip

    sc = scenario_cache("llama_untied_plus3")
    out = tmp_path / "out"
    result = merge_adapter(sc.base_dir, sc.adapter_dir, out, engine=engine, merge_base="nf4", validate="full", quiet=True)
    assert result.validation.ok, result.validation.findings
    assert any(n.startswith("--merge-base nf4: 14 Linear weights") for n in result.plan.notes)
    report = json.loads((out / "merge_report.json").read_text())
    assert report["merge_base"]["mode"] == "nf4" and report["merge_base"]["modules"] == 14
    assert 0.01 < report["merge_base"]["max_rel_difference_from_original"] < 0.2  # NF4's error on Gaussian weights
    # the truth, built here: every Linear but the head through bitsandbytes' NF4, then the unmerged adapter
    ids = torch.tensor([[1, 5, 9, 33] + sc.new_token_ids])
    base = LlamaForCausalLM.from_pretrained(sc.base_dir)
    base.resize_token_embeddings(sc.expect_embed_rows)
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.copy_(nf4_round_trip(module.weight))
        truth = PeftModel.from_pretrained(base, sc.adapter_dir).eval()(input_ids=ids).logits
        got = LlamaForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
        original = LlamaForCausalLM.from_pretrained(merge_adapter(sc.base_dir, sc.adapter_dir, tmp_path / "orig", quiet=True).out)
        far = original.eval()(input_ids=ids).logits
    assert ((got - truth).abs().max() / truth.abs().max()).item() < FP32_TOL
    assert ((far - truth).abs().max() / truth.abs().max()).item() > 1e-3  # the choice matters
    assert with_merge_base is not None


def test_nf4_without_bitsandbytes_is_one_line_and_writes_nothing(demo_pair, tmp_path, capsys, monkeypatch):
    import merger.quantized as quantized
    from merger.cli import main

    def missing():
        raise quantized.Nf4UnavailableError('an NF4 round trip needs bitsandbytes >= 0.46 (No module named bitsandbytes): pip install "merger[nf4]"')

    monkeypatch.setattr(quantized, "_bitsandbytes_functional", missing)
    out = tmp_path / "out"
    assert main(["--base", str(demo_pair[0]), "--adapter", str(demo_pair[1]), "--out", str(out), "--merge-base", "nf4"]) == 2
    err = capsys.readouterr().err
    assert 'pip install "merger[nf4]"' in err and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("recorded, evidence", [
    ("unsloth/llama-3-8b-bnb-4bit", "a 4-bit bitsandbytes model"),
    ("meta-llama/Llama-3-8B", None),
])
def test_inspect_says_when_an_adapter_was_trained_on_a_4bit_base(copies, recorded, evidence):
    from merger import inspect_adapter

    base, adapter = copies
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = recorded
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    notes = " ".join(inspect_adapter(base, adapter).notes)
    assert (evidence in notes and "--merge-base nf4" in notes) if evidence else "4-bit" not in notes


def test_a_training_config_beside_the_adapter_is_evidence(copies):
    from merger import inspect_adapter

    base, adapter = copies
    (adapter / "training_args.yaml").write_text("model_name_or_path: base\nquantization_bit: 4\nfinetuning_type: lora\n")
    notes = " ".join(inspect_adapter(base, adapter).notes)
    assert "training_args.yaml beside the adapter trained on a 4-bit base" in notes
