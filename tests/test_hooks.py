"""Merging where training ends: a real (tiny, CPU) transformers.Trainer run with MergeAdapterCallback,
its failure modes, and merge_peft_model on an in-memory PeftModel.

Everything is built here in code: a 64-token Llama base (hidden 32, 2 layers), a fine-tune that
adds 2 tokens and resizes with pad_to_multiple_of=8 (66 tokens -> 72 rows), LoRA on q/v plus
embed_tokens/lm_head in modules_to_save.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from merger import MergeAdapterCallback, MergerError, merge_peft_model
from merger.demo import build_tokenizer
from merger.errors import InputNotFoundError, OutputExistsError

BASE_VOCAB, NEW_TOKENS, PAD = 64, ["<|user|>", "<|bot|>"], 8
TOKENS, ROWS = BASE_VOCAB + len(NEW_TOKENS), 72  # 66 tokens padded to a multiple of 8
# prompts with both added tokens (64, 65) between old ones
IDS = torch.tensor([[1, 64, 5, 9, 65, 12, 3, 64], [1, 7, 65, 65, 20, 64, 33, 2]])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("hooks") / "base"
    config = LlamaConfig(vocab_size=BASE_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


def fine_tune_setup(base_dir, adapter_name="default"):
    """What a fine-tune script does before training: add tokens, resize (padded), wrap in LoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.add_special_tokens({"additional_special_tokens": NEW_TOKENS})
    tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    model.resize_token_embeddings(len(tok), pad_to_multiple_of=PAD, mean_resizing=False)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"],
                        task_type="CAUSAL_LM", base_model_name_or_path=str(base_dir))
    return get_peft_model(model, config, adapter_name=adapter_name), tok


def perturbed(model):
    """Stands in for training where a test does not need the Trainer: every trainable tensor moves."""
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    return model


def train(callback, base_dir, output_dir, steps=3):
    """A few real optimizer steps with transformers.Trainer on sequences using the new tokens."""
    from transformers import Trainer, TrainingArguments

    model, tok = fine_tune_setup(base_dir)
    gen = torch.Generator().manual_seed(0)
    rows = [torch.cat([torch.tensor([1, 64]), torch.randint(3, BASE_VOCAB, (8,), generator=gen), torch.tensor([65, 2])]) for _ in range(8)]
    data = [{"input_ids": r, "labels": r, "attention_mask": torch.ones_like(r)} for r in rows]
    args = TrainingArguments(output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True, logging_strategy="no", disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[callback])
    trainer.train()
    return trainer.model, tok


def logits(model, ids=IDS):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


def train_end(callback, model, tok, output_dir, main_process=True):
    """Call the hook the way transformers' CallbackHandler does, without a Trainer (for the cheap cases)."""
    args = SimpleNamespace(output_dir=str(output_dir))
    state = SimpleNamespace(is_world_process_zero=main_process)
    control = object()
    assert callback.on_train_end(args, state, control, model=model, processing_class=tok) is control


def test_callback_merges_after_real_training(base_dir, tmp_path, caplog):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    caplog.set_level(logging.INFO, logger="merger")
    callback = MergeAdapterCallback(base_dir, tmp_path / "merged", validate="full")
    trained, tok = train(callback, base_dir, tmp_path / "run")

    assert callback.error is None and callback.exception is None
    assert callback.result.validation.ok and callback.result.out == tmp_path / "merged"
    assert callback.adapter_dir == tmp_path / "run" / "final-adapter"
    with safe_open(str(callback.adapter_dir / "adapter_model.safetensors"), "pt") as f:
        saved = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    assert saved["base_model.model.model.embed_tokens.modules_to_save.weight"] == [ROWS, 32]
    assert (callback.adapter_dir / "tokenizer.json").is_file()
    assert any("merger: merged into" in r.getMessage() for r in caplog.records)
    # training really moved the adapter: LoRA B starts at zero
    assert all(p.abs().max() > 0 for n, p in trained.named_parameters() if "lora_B" in n)

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert merged.get_input_embeddings().weight.shape[0] == merged.config.vocab_size == ROWS
    trained_head = trained.base_model.model.lm_head.modules_to_save["default"].weight
    assert torch.equal(merged.lm_head.weight[BASE_VOCAB:TOKENS], trained_head[BASE_VOCAB:TOKENS].detach())
    # fp32 on both sides: the merged model computes (W + s·BA)x, PEFT computes Wx + s·B(Ax); the
    # same numbers summed in another order differ by a few ulps (~1e-7 here), so 1e-5 is a tight
    # bound with room for two layers of accumulation, while a lost row or a missed delta moves the
    # logits by more than 1e-2 (checked just below against the untrained base)
    torch.testing.assert_close(logits(merged), logits(trained), rtol=1e-5, atol=1e-5)
    base_logits = logits(AutoModelForCausalLM.from_pretrained(base_dir), IDS.clamp(max=BASE_VOCAB - 1))
    assert (logits(merged, IDS.clamp(max=BASE_VOCAB - 1))[..., :BASE_VOCAB] - base_logits).abs().max() > 1e-2

    merged_tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert len(merged_tok) == len(tok) == TOKENS
    assert merged_tok.convert_tokens_to_ids(NEW_TOKENS) == [64, 65]


def test_failed_merge_keeps_the_adapter_logs_and_does_not_raise(base_dir, tmp_path, caplog):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    callback = MergeAdapterCallback(base_dir, out)
    train(callback, base_dir, tmp_path / "run", steps=1)  # returns normally: training is not crashed by the merge

    assert callback.result is None
    assert isinstance(callback.exception, OutputExistsError)
    assert callback.error.startswith(f"--out {out}: exists and is not empty")
    assert "\n" not in callback.error
    adapter = tmp_path / "run" / "final-adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in adapter.iterdir()}
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and r.name == "merger.hooks"]
    assert errors == [f"merger: the merge after training failed; the trained adapter is kept at {adapter}: {callback.error}"]


def test_raise_on_error_raises_after_saving_the_adapter(base_dir, tmp_path):
    model, tok = fine_tune_setup(base_dir)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    callback = MergeAdapterCallback(base_dir, out, raise_on_error=True)
    with pytest.raises(OutputExistsError):
        train_end(callback, model, tok, tmp_path / "run")
    assert (tmp_path / "run" / "final-adapter" / "adapter_model.safetensors").is_file()
    assert callback.error.startswith(f"--out {out}")


def test_only_the_main_process_saves_and_merges(base_dir, tmp_path):
    model, tok = fine_tune_setup(base_dir)
    callback = MergeAdapterCallback(base_dir, tmp_path / "merged")
    train_end(callback, model, tok, tmp_path / "run", main_process=False)
    assert (callback.result, callback.error) == (None, None)
    assert not (tmp_path / "run").exists() and not (tmp_path / "merged").exists()


def test_a_model_without_adapter_is_reported_not_raised(base_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    callback = MergeAdapterCallback(base_dir, tmp_path / "merged")
    train_end(callback, AutoModelForCausalLM.from_pretrained(base_dir), None, tmp_path / "run")
    assert callback.result is None
    assert callback.error == "the trained model is not a PeftModel (it has no peft_config); there is no adapter to merge"
    assert not (tmp_path / "merged").exists()


def test_sharded_parameters_are_refused_with_a_way_out(base_dir, tmp_path, caplog):
    model, tok = fine_tune_setup(base_dir)
    lora_a = next(p for n, p in model.named_parameters() if "lora_A" in n)
    lora_a.data = torch.empty(0)  # what DeepSpeed ZeRO-3 leaves of a parameter on each process
    callback = MergeAdapterCallback(base_dir, tmp_path / "merged")
    train_end(callback, model, tok, tmp_path / "run")
    assert callback.error.startswith("the model's parameters are sharded across processes (base_model.model.model.layers.0.self_attn.q_proj.lora_A")
    assert callback.error.endswith("save the adapter with trainer.save_model(DIR) and merge DIR with merger.merge_adapter(base, DIR, out)")
    assert not (tmp_path / "run" / "final-adapter").exists() and not (tmp_path / "merged").exists()
    assert [r.levelno for r in caplog.records if r.name == "merger.hooks"] == [logging.ERROR]


def test_a_reused_callback_reports_only_its_latest_run(base_dir, tmp_path):
    model, tok = fine_tune_setup(base_dir)
    perturbed(model)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "stale.txt").write_text("x")
    run = tmp_path / "run"
    (run / "final-adapter").mkdir(parents=True)
    (run / "final-adapter" / "adapter_model.bin").write_bytes(b"an earlier run's adapter")
    callback = MergeAdapterCallback(base_dir, out)
    train_end(callback, model, tok, run)
    assert callback.result is None and "exists and is not empty" in callback.error

    (out / "stale.txt").unlink()
    train_end(callback, model, tok, run)
    assert callback.error is None and callback.exception is None and callback.result.validation.ok
    # the adapter folder holds exactly this run's adapter, nothing left from before
    assert not (run / "final-adapter" / "adapter_model.bin").exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


def test_unknown_options_fail_before_training(base_dir, tmp_path):
    with pytest.raises(MergerError, match=r"MergeAdapterCallback: unknown option 'shard'; known options are "):
        MergeAdapterCallback(base_dir, tmp_path / "out", shard="1GB")
    with pytest.raises(MergerError, match=r"option dtype: 'fp8' is not one of auto, float32, bfloat16, float16"):
        MergeAdapterCallback(base_dir, tmp_path / "out", dtype="fp8")


def test_merge_peft_model_in_memory(base_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = fine_tune_setup(base_dir)
    perturbed(model)
    result = merge_peft_model(model, tmp_path / "merged", tokenizer=tok)  # base: the recorded base_model_name_or_path
    assert result.validation.ok and result.plan.embed.rows == result.plan.head.rows == ROWS
    assert result.plan.base.folder == base_dir
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    # fp32, same math in another order: see test_callback_merges_after_real_training
    torch.testing.assert_close(logits(merged), logits(model), rtol=1e-5, atol=1e-5)
    assert len(AutoTokenizer.from_pretrained(tmp_path / "merged")) == TOKENS
    assert model.peft_config["default"].base_model_name_or_path == str(base_dir)  # the user's model is left as it was


def test_merge_peft_model_named_adapter_and_explicit_base(base_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = fine_tune_setup(base_dir, adapter_name="sft")
    perturbed(model)
    model.peft_config["sft"].base_model_name_or_path = str(tmp_path / "moved-away")
    result = merge_peft_model(model, tmp_path / "merged", tokenizer=tok, base=base_dir, dtype="float32")
    assert result.validation.ok and result.plan.embed.rows == ROWS
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    torch.testing.assert_close(logits(merged), logits(model), rtol=1e-5, atol=1e-5)


def test_merge_peft_model_needs_a_base(base_dir, tmp_path):
    model, tok = fine_tune_setup(base_dir)
    model.peft_config["default"].base_model_name_or_path = None
    with pytest.raises(InputNotFoundError, match=r"^the adapter config names no base_model_name_or_path; pass base= "):
        merge_peft_model(model, tmp_path / "merged", tokenizer=tok)
    assert not (tmp_path / "merged").exists()


def test_merge_peft_model_refuses_what_is_not_a_peft_model(base_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    with pytest.raises(MergerError, match="merge_peft_model: the model has no peft_config"):
        merge_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "merged", base=base_dir)
    with pytest.raises(MergerError, match=r"merge_peft_model\(\): unknown option 'shard_size'"):
        merge_peft_model(fine_tune_setup(base_dir)[0], tmp_path / "merged", shard_size="1GB")
