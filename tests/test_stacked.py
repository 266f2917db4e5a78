"""Stacked adapters (PT -> SFT -> DPO) merged in one pass, proven against the pipeline's own
sequential PEFT merges: each stage merged with merge_and_unload, the next trained on that."""

from __future__ import annotations

import json

import pytest
import torch

from .factories import medical_pipeline

FP32_TOL = 1e-5  # fp32 end to end: merged vs sequentially merged differ only in summation order


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return medical_pipeline(tmp_path_factory.mktemp("stack"))


@pytest.fixture(scope="module")
def tied_pipeline(tmp_path_factory):
    return medical_pipeline(tmp_path_factory.mktemp("stack-tied"), tied=True)


def truth_logits(stack, ids):
    """The trained model: the user's merge of every stage but the last, with the last loaded unmerged."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(stack.merged_dirs[-2])
    model = PeftModel.from_pretrained(base, stack.adapter_dirs[-1]).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def merged_logits(out, ids):
    from transformers import LlamaForCausalLM

    with torch.no_grad():
        return LlamaForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits


def probe(stack):
    return torch.tensor([stack.new_token_ids + [3, 9, 17, 40, 63]])


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["stream", "peft"])
@pytest.mark.parametrize("which", ["pipeline", "tied_pipeline"])
def test_a_three_stage_stack_merges_in_one_pass_like_the_sequential_merges(request, which, engine, tmp_path):
    from merger import merge_adapter

    stack = request.getfixturevalue(which)
    out = tmp_path / "out"
    result = merge_adapter(stack.base_dir, stack.adapter_dirs, out, engine=engine, validate="full", quiet=True)
    assert result.engine == engine and result.validation.ok, result.validation.findings
    assert [s.adapter.folder for s in result.plan.stages] == stack.adapter_dirs
    ids = probe(stack)
    expected, got = truth_logits(stack, ids), merged_logits(out, ids)
    assert got.shape == expected.shape == (1, ids.shape[1], stack.rows[-1])
    err = ((got - expected).abs().max() / expected.abs().max()).item()
    assert err < FP32_TOL, err
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == stack.rows[-1] == 80
    # the tokenizer written is the last stage's that has one (SFT's; DPO saved none)
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(out)) == stack.tokenizer_len == 74
    report = json.loads((out / "merge_report.json").read_text())
    assert report["inputs"]["stages"] == [str(d) for d in stack.adapter_dirs]
    assert set(report["inputs"]["sha256"]) == {"stage 1 adapter", "stage 2 adapter", "stage 3 adapter", "base"}
    assert report["validation"]["metrics"]["logits_checked"] is True


def test_each_stage_tells_its_story(pipeline):
    from merger import inspect_adapter

    plan = inspect_adapter(pipeline.base_dir, pipeline.adapter_dirs)
    assert not plan.problems, plan.problems
    assert [s.embed.rows for s in plan.stages] == [72, 80, 80]
    assert [s.embed.base_rows for s in plan.stages] == [64, 72, 80]
    stories = plan.stories
    assert stories[0].startswith("stage 1 (pt): ") and "72" in stories[0]
    assert any(s.startswith("stage 2 (sft): ") and "80" in s for s in stories)
    assert "stage 2 has no tokenizer" not in plan.tokenizer_reason and "stage 3 has no tokenizer" in plan.tokenizer_reason
    assert plan.tokenizer_source == str(pipeline.adapter_dirs[1])


def test_stages_out_of_order_are_refused(pipeline, tmp_path, capsys):
    from merger.cli import main

    out = tmp_path / "out"
    code = main(["--base", str(pipeline.base_dir), "--adapter", str(pipeline.adapter_dirs[1]), "--adapter",
                 str(pipeline.adapter_dirs[0]), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "stage 1 (sft)" in err or "stage 2 (pt)" in err
    assert not out.exists()


def test_the_cli_repeats_adapter_and_a_config_file_lists_stages(pipeline, tmp_path, capsys):
    from merger.cli import main

    config = tmp_path / "stack.yaml"
    config.write_text("adapter:\n" + "".join(f"  - {d}\n" for d in pipeline.adapter_dirs) + f"base: {pipeline.base_dir}\n")
    assert main(["inspect", "--config", str(config), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["embed"]["rows"] == 80 and len(plan["stages"]) == 3
    args = ["inspect", "--base", str(pipeline.base_dir)] + [x for d in pipeline.adapter_dirs for x in ("--adapter", str(d))]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "stage 1 (pt)" in text and "stage 3 (dpo)" in text


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["stream", "peft"])
def test_an_earlier_stage_with_lora_on_a_tied_embedding_stays_tied_as_the_pipeline_merged_it(tmp_path, engine):
    """merge_and_unload writes an embedding LoRA into the matrix a tied head shares: the next stage was
    trained on that tied model (a last stage unties instead: its trained head never saw the update)."""
    from merger import merge_adapter

    from .factories import StageSpec, build_stack

    stack = build_stack(tmp_path / "stack", [
        StageSpec("pt", dict(target_modules=["embed_tokens", "q_proj"]), words=("gene",), pad_to_multiple_of=8),
        StageSpec("sft", dict(target_modules=["q_proj", "v_proj"]), save_tokenizer=False),
    ], tied=True)
    out = tmp_path / "out"
    result = merge_adapter(stack.base_dir, stack.adapter_dirs, out, engine=engine, quiet=True)
    assert result.validation.ok and [s.tie_word_embeddings for s in result.plan.stages] == [True, True]
    ids = probe(stack)
    expected, got = truth_logits(stack, ids), merged_logits(out, ids)
    assert ((got - expected).abs().max() / expected.abs().max()).item() < FP32_TOL
