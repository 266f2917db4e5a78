"""Which engine runs and why; what the stream engine refuses; the CLI's machine-readable result."""

import json

import pytest
import torch

from merger import UnsupportedError, merge_adapter
from merger.cli import main
from merger.demo import build_demo_pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build_demo_pair(tmp_path_factory.mktemp("choice"))


@pytest.fixture
def bin_base(pair, tmp_path):
    """The same base stored the legacy way, as pytorch_model.bin."""
    from safetensors.torch import load_file

    folder = tmp_path / "bin-base"
    folder.mkdir()
    for item in pair[0].iterdir():
        if item.suffix != ".safetensors":
            (folder / item.name).write_bytes(item.read_bytes())
    torch.save(load_file(pair[0] / "model.safetensors"), folder / "pytorch_model.bin")
    return folder


def test_auto_picks_stream_when_it_can(pair, tmp_path):
    result = merge_adapter(*pair, tmp_path / "out")
    assert result.engine == "stream" and "fully supported" in result.engine_reason


def test_auto_falls_back_to_peft_and_says_why(pair, bin_base, tmp_path):
    result = merge_adapter(bin_base, pair[1], tmp_path / "out", validate="full")
    assert result.engine == "peft" and "pytorch_model.bin" in result.engine_reason
    assert result.validation.ok and (tmp_path / "out" / "model.safetensors").is_file()


def test_stream_refuses_what_it_cannot_do_and_points_to_peft(pair, bin_base, tmp_path):
    with pytest.raises(UnsupportedError, match=r"--engine stream cannot run this merge \(the base is stored as pytorch_model.bin\); use --engine peft"):
        merge_adapter(bin_base, pair[1], tmp_path / "out", engine="stream")
    assert not (tmp_path / "out").exists()


def test_cli_json_result_and_summary_line(pair, tmp_path, capsys):
    assert main(["--base", str(pair[0]), "--adapter", str(pair[1]), "--out", str(tmp_path / "out"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True and data["engine"] == "stream" and data["files"] == ["model.safetensors"]
    assert data["plan"]["embed"]["rows"] == 80 and data["validation"]["findings"] == []
    assert main(["--base", str(pair[0]), "--adapter", str(pair[1]), "--out", str(tmp_path / "out2"), "-q"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"merged into {tmp_path / 'out2'}") and "stream engine" in lines[0]


def test_full_validation_says_when_the_model_is_too_big(pair, tmp_path, monkeypatch):
    import merger.logits as logits

    monkeypatch.setattr(logits, "available_memory", lambda: 1000)
    result = merge_adapter(*pair, tmp_path / "out", validate="full")
    assert result.validation.ok and result.validation.metrics["logits_checked"] is False
    assert any(c.startswith("logits comparison skipped: base + merged model need about") for c in result.validation.checks)


def test_merge_report_records_inputs_and_results(pair, tmp_path):
    import hashlib

    result = merge_adapter(*pair, tmp_path / "out", validate="full")
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    weights = pair[1] / "adapter_model.safetensors"
    assert report["inputs"]["sha256"]["adapter"]["adapter_model.safetensors"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert set(report["inputs"]["sha256"]["base"]) == {p.name for p in pair[0].iterdir()}
    assert report["engine"]["name"] == "stream" and report["versions"]["peft"]
    assert report["validation"]["ok"] and report["validation"]["metrics"]["max_rel_error_logits"] < 1e-4
    assert report["plan"]["embed"]["rows"] == 80 == result.plan.embed.rows


@pytest.fixture(scope="module")
def moe_scenario(tmp_path_factory):
    """Qwen2-MoE: the checkpoint stores each expert apart and transformers stacks them on load."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    from .factories import EMBED_AND_HEAD, _build

    config = Qwen2MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                            shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            tie_word_embeddings=False, max_position_embeddings=64)
    return _build(tmp_path_factory.mktemp("moe"), name="moe", description="Qwen2-MoE, +2 tokens, LoRA on attention",
                  make_model=lambda: Qwen2MoeForCausalLM(config), base_tokens=64, specials=("<a>", "<b>"),
                  lora=dict(target_modules=["q_proj", "v_proj"], modules_to_save=EMBED_AND_HEAD),
                  expect_rows=66, expect_tied=False)


@pytest.mark.parametrize("engine", ["auto", "peft"])
def test_moe_experts_stacked_on_load_stream_and_match_peft(moe_scenario, tmp_path, engine):
    """The checkpoint's per-expert tensors are copied as they are: transformers stacks them on load."""
    from .factories import model_class, reference_logits, sample_input_ids

    sc = moe_scenario
    result = merge_adapter(sc.base_dir, sc.adapter_dir, tmp_path / "out", validate="full", engine=engine)
    assert result.engine == ("stream" if engine == "auto" else "peft") and result.validation.ok
    ids = sample_input_ids(sc)
    merged = model_class(result.out).from_pretrained(result.out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    # fp32, the same sums in another order: see tests/test_merge_cases.py
    torch.testing.assert_close(got, reference_logits(sc, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("engine", ["auto", "peft"])
def test_lora_on_stacked_moe_experts_is_merged_and_proven_by_logits(tmp_path, engine):
    # transformers 5 keeps Mixtral's experts as stacked nn.Parameters; PEFT adapts them with
    # target_parameters, saving keys like experts.lora_A.weight / experts.base_layer.lora_A.weight
    from transformers import MixtralConfig, MixtralForCausalLM

    from .factories import _build, model_class, reference_logits, sample_input_ids

    config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                           tie_word_embeddings=False, max_position_embeddings=64)
    sc = _build(tmp_path / "pair", name="mixtral-experts", description="LoRA on q/v and on the stacked experts",
                make_model=lambda: MixtralForCausalLM(config), base_tokens=64,
                lora=dict(target_modules=["q_proj", "v_proj"], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
                expect_rows=64, expect_tied=False)
    assert any(k.endswith("experts.base_layer.lora_A.weight") for k in sc.adapter_keys)

    result = merge_adapter(sc.base_dir, sc.adapter_dir, tmp_path / "out", engine=engine)  # validate: the default, fast
    assert result.engine == ("stream" if engine == "auto" else "peft")
    # the stacked-expert pairs have their own per-module check: fast stays fast on the stream engine
    assert result.validation.mode == "fast" and result.validation.metrics["modules_checked"] == 8
    assert not result.plan.parameter_lora and sum(1 for op in result.plan.ops if op.expert) == 2 * 4 * 3
    ids = sample_input_ids(sc)
    merged = model_class(result.out).from_pretrained(result.out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    reference = reference_logits(sc, ids)
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the experts' update matters: without it the logits are far off
        plain = model_class(sc.base_dir).from_pretrained(sc.base_dir, dtype=torch.float32).eval()(input_ids=ids).logits
    assert (plain - reference).abs().max() > 1e-3


def _mllama(vocab: int = 64):
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaTextConfig, MllamaVisionConfig

    text = MllamaTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            num_key_value_heads=2, cross_attention_layers=[1], bos_token_id=1, eos_token_id=2, pad_token_id=0,
                            max_position_embeddings=64)
    vision = MllamaVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                                image_size=8, patch_size=4, vision_output_dim=32, intermediate_layers_indices=[0],
                                max_num_tiles=1, supported_aspect_ratios=[[1, 1]])
    return MllamaForConditionalGeneration(MllamaConfig(text_config=text, vision_config=vision, image_token_index=3))


def test_mllama_keeps_its_embedding_eight_rows_past_the_head(tmp_path):
    # Mllama: nn.Embedding(vocab_size + 8) beside a vocab_size-row head; a plain LoRA must not
    # "grow" the head to the embedding's rows (the checkpoint would not load)
    from peft import LoraConfig, get_peft_model

    from .factories import perturb_trainable

    base = tmp_path / "base"
    torch.manual_seed(0)
    _mllama().save_pretrained(base)
    model = type(_mllama()).from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    perturb_trainable(peft_model, seed=1)
    peft_model.save_pretrained(tmp_path / "adapter")

    result = merge_adapter(base, tmp_path / "adapter", tmp_path / "out", validate="full")
    assert (result.plan.embed.rows, result.plan.head.rows, result.plan.embed_extra_rows) == (72, 64, 8)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["text_config"]["vocab_size"] == 64
    merged = type(model).from_pretrained(tmp_path / "out").eval()
    ids = torch.tensor([[1, 5, 9, 10, 11, 12]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, peft_model.eval()(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_mllama_resized_by_transformers_gets_its_design_rows_back(tmp_path):
    # what users call: resize_token_embeddings gives Mllama's embedding the head's rows (72/72),
    # dropping its vocab_size + 8 design; merged, the embedding gets 8 rows past every token id
    # again, so the checkpoint loads and every token's logits are the trained model's
    from peft import LoraConfig, get_peft_model

    from .factories import perturb_trainable

    base = tmp_path / "base"
    _mllama().save_pretrained(base)
    model = type(_mllama()).from_pretrained(base)
    model.resize_token_embeddings(72)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]))
    perturb_trainable(peft_model, seed=2)
    peft_model.save_pretrained(tmp_path / "adapter", save_embedding_layers=True)

    with pytest.raises(UnsupportedError, match=r"--engine peft: transformers' resize_token_embeddings gives MllamaForConditionalGeneration's head"):
        merge_adapter(base, tmp_path / "adapter", tmp_path / "peft", engine="peft")
    result = merge_adapter(base, tmp_path / "adapter", tmp_path / "out", validate="full")
    assert (result.plan.embed.rows, result.plan.head.rows, result.plan.embed_design_pad) == (80, 72, 8)
    assert result.validation.ok and result.validation.metrics["logits_checked"] is True
    assert "rows 72-79 restore MllamaForConditionalGeneration's design rows; no token uses them" in " ".join(result.plan.notes)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["text_config"]["vocab_size"] == 72
    merged = type(model).from_pretrained(tmp_path / "out").eval()
    ids = torch.tensor([[1, 5, 9, 64, 70, 71]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, peft_model.eval()(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
