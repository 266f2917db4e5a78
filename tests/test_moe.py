"""Mixture-of-experts LoRA on the stream engine: stacked-expert pairs (PEFT's target_parameters on
transformers 5's fused experts) and per-expert Linear LoRA (older PEFT), merged into checkpoints
that store the experts one by one (as transformers 5 saves Qwen3-MoE and Mixtral), narrow and
wide experts, against PEFT."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from .test_drift import FP32_TOL, build_expert_lora

E, R = 4, 2


def logits_of(out, ids):
    from transformers import Qwen3MoeForCausalLM

    with torch.no_grad():
        return Qwen3MoeForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits


def relative(got, truth) -> float:
    return ((got - truth).abs().max() / truth.abs().max()).item()


@pytest.mark.slow
@pytest.mark.parametrize("moe_intermediate", [24, 48], ids=["narrow experts", "wide experts"])
def test_stacked_expert_lora_streams_into_per_expert_tensors(tmp_path, moe_intermediate):
    from merger import merge_adapter

    ids, truth = build_expert_lora(tmp_path, moe_intermediate)
    for engine in ("stream", "peft"):
        out = tmp_path / engine
        result = merge_adapter(tmp_path / "base", tmp_path / "adapter", out, engine=engine, validate="full", quiet=True)
        assert result.validation.ok, result.validation.findings
        assert relative(logits_of(out, ids), truth) < FP32_TOL, engine
    plan = result.plan
    assert not plan.stream_blockers and not plan.parameter_lora
    experts = [op for op in plan.ops if op.expert]
    assert len(experts) == 2 * E * 3  # 2 layers x 4 experts x (gate, up, down): every expert accounted for
    up = next(op for op in experts if op.out_key == "model.layers.1.mlp.experts.2.up_proj.weight")
    assert (up.expert.expert, up.expert.row_offset) == (2, moe_intermediate)  # below gate's rows in gate_up_proj


def per_expert_adapter(root, seed: int = 3):
    """A LoRA on every expert's gate/up/down Linear, as PEFT saved it on transformers 4's per-expert
    modules, and the same update as one stacked-expert adapter (rank 2r: gate's and up's pairs side by
    side, down padded with zeros; alpha doubled to keep alpha/r) that today's PEFT loads as the reference."""
    gen = torch.Generator().manual_seed(seed)
    base = load_file(root / "base" / "model.safetensors")
    per_expert, stacked = {}, {}
    prefix = "base_model.model.model.layers.{layer}.mlp.experts"
    for layer in range(2):
        pairs = {}
        for name in ("gate_proj", "up_proj", "down_proj"):
            out_f, in_f = base[f"model.layers.{layer}.mlp.experts.0.{name}.weight"].shape
            for e in range(E):
                a, b = torch.randn(R, in_f, generator=gen) * 0.3, torch.randn(out_f, R, generator=gen) * 0.3
                key = f"{prefix.format(layer=layer)}.{e}.{name}"
                per_expert[f"{key}.lora_A.weight"], per_expert[f"{key}.lora_B.weight"] = a, b
                pairs[(name, e)] = (a, b)
        for param, names in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
            a_stack, b_cols = [], []
            for e in range(E):
                a_e = torch.cat([pairs[(n, e)][0] for n in names] + ([torch.zeros_like(pairs[(names[0], e)][0])] if len(names) == 1 else []))
                b_e = torch.block_diag(*[pairs[(n, e)][1] for n in names]) if len(names) == 2 else torch.cat(
                    [pairs[(names[0], e)][1], torch.zeros_like(pairs[(names[0], e)][1])], dim=1)
                a_stack.append(a_e)
                b_cols.append(b_e)
            b_flat = torch.stack(b_cols, dim=2).reshape(b_cols[0].shape[0], -1)  # (out, 2r·E), rank-major
            depth = ".base_layer" if param == "gate_up_proj" else ""
            key = f"{prefix.format(layer=layer)}{depth}"
            stacked[f"{key}.lora_A.weight"] = torch.cat(a_stack)
            stacked[f"{key}.lora_B.weight"] = b_flat
    for name, weights, config in (
        ("per-expert", per_expert, dict(target_modules=["gate_proj", "up_proj", "down_proj"], r=R, lora_alpha=4)),
        ("stacked", stacked, dict(target_modules=None, r=2 * R, lora_alpha=8,
                                  target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])),
    ):
        folder = root / name
        folder.mkdir()
        save_file(weights, folder / "adapter_model.safetensors")
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", "lora_dropout": 0.0,
                                                                "bias": "none", "peft_version": "0.21.2", **config}))
    return root / "per-expert", root / "stacked"


@pytest.mark.slow
def test_per_expert_lora_of_an_older_peft_merges_into_the_per_expert_tensors(tmp_path):
    from peft import PeftModel
    from transformers import Qwen3MoeForCausalLM

    from merger import merge_adapter

    ids, _ = build_expert_lora(tmp_path)
    per_expert, stacked = per_expert_adapter(tmp_path)
    with torch.no_grad():
        reference = PeftModel.from_pretrained(Qwen3MoeForCausalLM.from_pretrained(tmp_path / "base"), stacked).eval()
        truth = reference(input_ids=ids).logits
    out = tmp_path / "out"
    result = merge_adapter(tmp_path / "base", per_expert, out, validate="full", quiet=True)
    assert result.engine == "stream" and result.validation.ok, result.validation.findings
    assert any("logits comparison skipped" in c and "per-expert modules" in c for c in result.validation.checks)
    assert relative(logits_of(out, ids), truth) < FP32_TOL
    # and the stacked form of the same update merges to the same model
    result = merge_adapter(tmp_path / "base", stacked, tmp_path / "out2", validate="full", quiet=True)
    assert relative(logits_of(tmp_path / "out2", ids), truth) < FP32_TOL


def test_per_expert_lora_refuses_the_peft_engine(tmp_path, capsys):
    from merger.cli import main

    build_expert_lora(tmp_path)
    per_expert, _ = per_expert_adapter(tmp_path)
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["--base", str(tmp_path / "base"), "--adapter", str(per_expert), "--out", str(out), "--engine", "peft"]) == 2
    err = capsys.readouterr().err
    assert "per-expert modules" in err and "PEFT cannot load it" in err and err.count("\n") == 1, err


def test_an_expert_missing_from_the_checkpoint_is_refused_not_left_untrained(tmp_path, capsys):
    from merger.cli import main

    build_expert_lora(tmp_path)
    weights = load_file(tmp_path / "base" / "model.safetensors")
    del weights["model.layers.1.mlp.experts.2.up_proj.weight"]
    save_file(weights, tmp_path / "base" / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "model.layers.1.mlp.experts.gate_up_proj" in err and "no tensor for expert 2 (mlp.experts.*.up_proj.weight)" in err, err
    assert not out.exists()


def test_validation_catches_an_expert_whose_update_went_missing(tmp_path, monkeypatch):
    """The per-expert check is a second opinion: an engine that drops one expert's update fails it."""
    import merger.engines.stream as stream
    import merger.validate as validate
    from merger import merge_adapter
    from merger.errors import ValidationFailedError

    build_expert_lora(tmp_path)
    real = stream.OpRunner._expert_factors

    def drop_expert_two(self, op):
        factors = real(self, op)
        if op.expert is not None and op.expert.expert == 2:
            return factors[0] * 0, factors[1]
        return factors

    monkeypatch.setattr(stream.OpRunner, "_expert_factors", drop_expert_two)
    monkeypatch.setattr(validate, "SAMPLED_MODULES", 1000)  # every expert tensor checked
    with pytest.raises(ValidationFailedError, match=r"experts\.2\.(gate|up|down)_proj\.weight: W_merged·x differs"):
        merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", engine="stream", quiet=True)
    assert not (tmp_path / "out").exists()
