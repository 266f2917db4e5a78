"""merger.integrations.autotrain: Autotrain's merge_adapter and merge_llm_adapter, swapped in unchanged.

The project folder is built the way Autotrain's LLM trainer leaves it: the tokenizer gained tokens,
the model was resized to exactly len(tokenizer) (Autotrain passes no pad multiple), LoRA without
modules_to_save, and ``trainer.save_model`` wrote the adapter (PEFT then saves the resized embedding
layers on its own), the tokenizer, ``training_args.bin`` and Autotrain's README.md model card.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import pytest
import torch

from merger.demo import build_tokenizer
from merger.errors import (
    IncompatibleError,
    InputNotFoundError,
    OptionsError,
)
from merger.integrations import autotrain
from merger.integrations.autotrain import merge_adapter, merge_llm_adapter

BASE_VOCAB, NEW_TOKENS = 64, ["<|im_start|>", "<|im_end|>"]
TOKENS = BASE_VOCAB + len(NEW_TOKENS)
IDS = torch.tensor([[1, 64, 5, 9, 65, 12, 3, 64]])
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
# PEFT says so when it saves the resized embedding layers of an Autotrain-style run; that is the point here
pytestmark = pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning")


def tiny_llama(hidden=32, vocab=BASE_VOCAB):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                        bos_token_id=1, eos_token_id=2))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("autotrain") / "base"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tiny_llama().save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


def trained_peft_model(base_dir, pad_to_multiple_of=None):
    """Autotrain's get_tokenizer + get_model: added chat tokens, resize, LoRA on the attention projections."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.add_special_tokens({"additional_special_tokens": NEW_TOKENS})
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    with torch.random.fork_rng():
        torch.manual_seed(2)
        model = AutoModelForCausalLM.from_pretrained(base_dir)
        model.resize_token_embeddings(len(tok), pad_to_multiple_of=pad_to_multiple_of)  # new rows: transformers' random mean init
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM",
                            base_model_name_or_path=str(base_dir))
        model = get_peft_model(model, config)
        with torch.no_grad():  # stands in for training
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(torch.randn_like(param) * 0.05)
    return model, tok


@pytest.fixture(scope="module")
def trained(base_dir):
    return trained_peft_model(base_dir)


@pytest.fixture
def project(trained, tmp_path):
    """The Autotrain project folder after ``trainer.save_model(project_name)`` and the model card."""
    model, tok = trained
    folder = tmp_path / "project"
    model.save_pretrained(folder)  # save_embedding_layers="auto": PEFT sees the resize and saves embed/head
    tok.save_pretrained(folder)
    (folder / "training_args.bin").write_bytes(b"training args")
    (folder / "README.md").write_text("autotrain model card")
    return folder


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits.float()


def test_signatures_are_autotrains():
    assert list(inspect.signature(merge_adapter).parameters)[:3] == ["base_model_path", "target_model_path", "adapter_path"]
    params = inspect.signature(merge_llm_adapter).parameters
    assert list(params)[:6] == ["base_model_path", "adapter_path", "token", "output_folder", "pad_to_multiple_of", "push_to_hub"]
    assert [params[n].default for n in ("token", "output_folder", "pad_to_multiple_of", "push_to_hub")] == [None, None, None, False]


def test_post_training_merge_replaces_the_adapter_in_the_project(base_dir, trained, project):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with safe_open(str(project / "adapter_model.safetensors"), "pt") as f:  # the scenario is what we claim
        assert f.get_slice("base_model.model.model.embed_tokens.weight").get_shape() == [TOKENS, 32]
    before = snapshot(project)

    # exactly Autotrain's call: the project folder is both the target and the adapter
    result = merge_adapter(base_model_path=str(base_dir), target_model_path=str(project), adapter_path=str(project))

    assert result.validation.ok and result.out == project
    names = {p.name for p in project.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "merge_report.json"} <= names
    assert not ADAPTER_FILES & names
    for kept in ("README.md", "training_args.bin", "tokenizer.json"):  # the rest of the project is untouched
        assert (project / kept).read_bytes() == before[kept]
    assert json.loads((project / "config.json").read_text())["vocab_size"] == TOKENS
    assert json.loads((project / "merge_report.json").read_text())["output"]["path"] == str(project)
    assert sorted(p.name for p in project.parent.iterdir()) == ["project"]  # no staging folder left beside it

    merged = AutoModelForCausalLM.from_pretrained(project, dtype=torch.float32)
    # fp32: (W + s·BA)x against PEFT's Wx + s·B(Ax), the same sums in another order (~1e-7 apart)
    torch.testing.assert_close(logits(merged), logits(trained[0]), rtol=1e-5, atol=1e-5)
    assert AutoTokenizer.from_pretrained(project).chat_template == trained[1].chat_template


@pytest.mark.parametrize("bad_base", ["missing", "wrong-hidden-size"])
def test_a_failed_merge_keeps_the_adapter(bad_base, tmp_path, project):
    base = tmp_path / bad_base
    if bad_base == "wrong-hidden-size":
        tiny_llama(hidden=48).save_pretrained(base)
        build_tokenizer().save_pretrained(base)
    before = snapshot(project)
    expected = InputNotFoundError if bad_base == "missing" else IncompatibleError
    with pytest.raises(expected) as caught:
        merge_adapter(str(base), str(project), str(project))
    assert "\n" not in str(caught.value)
    assert snapshot(project) == before  # adapter, tokenizer and card byte for byte
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_tokenizer_comes_from_the_target(base_dir, trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = trained
    adapter, target = tmp_path / "adapter", tmp_path / "target"
    model.save_pretrained(adapter)
    tok.save_pretrained(adapter)
    target_tok = AutoTokenizer.from_pretrained(adapter)
    target_tok.chat_template = "target template {{ messages }}"
    target_tok.save_pretrained(target)
    # an earlier merge into the target, sharded differently: its shards must not survive
    (target / "model-00001-of-00002.safetensors").write_bytes(b"old")
    (target / "model.safetensors.index.json").write_text("{}")
    adapter_before = snapshot(adapter)

    result = merge_adapter(str(base_dir), str(target), str(adapter))

    assert result.validation.ok
    assert AutoTokenizer.from_pretrained(target).chat_template == "target template {{ messages }}"
    assert not (target / "model-00001-of-00002.safetensors").exists() and not (target / "model.safetensors.index.json").exists()
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)), logits(model), rtol=1e-5, atol=1e-5)
    assert snapshot(adapter) == adapter_before  # only the target's adapter files are ever removed


def test_merge_llm_adapter_default_output_folder(base_dir, trained, project):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    before = snapshot(project)
    result = merge_llm_adapter(str(base_dir), str(project) + "/", token=None)
    out = project.parent / "project-merged"
    assert result.out == out and result.validation.ok
    assert snapshot(project) == before  # the tool never touches the adapter folder
    assert len(AutoTokenizer.from_pretrained(out)) == TOKENS  # the adapter's tokenizer, as Autotrain loads it
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)), logits(trained[0]), rtol=1e-5, atol=1e-5)


def test_merge_llm_adapter_pad_to_multiple_of_sizes_rows_the_tensors_do_not_fix(base_dir, tmp_path):
    model, tok = trained_peft_model(base_dir, pad_to_multiple_of=8)
    adapter = tmp_path / "lora-only"
    model.save_pretrained(adapter, save_embedding_layers=False)  # only LoRA pairs: no tensor tells the rows
    tok.save_pretrained(adapter)
    padded = merge_llm_adapter(str(base_dir), str(adapter), output_folder=str(tmp_path / "padded"), pad_to_multiple_of=8)
    exact = merge_llm_adapter(str(base_dir), str(adapter), output_folder=str(tmp_path / "exact"))
    assert (padded.plan.embed.rows, exact.plan.embed.rows) == (72, TOKENS)
    assert json.loads((tmp_path / "padded" / "config.json").read_text())["vocab_size"] == 72


def test_merge_llm_adapter_push_needs_the_adapters_hub_id(base_dir, project):
    """Autotrain pushes to the repo adapter_path names; a local project folder names none (tests/test_hub.py pushes)."""
    refusal = r"^merge_llm_adapter: push_to_hub=True pushes to the adapter's Hub repo, as Autotrain does, but adapter_path "
    with pytest.raises(OptionsError, match=refusal):
        merge_llm_adapter(str(base_dir), str(project), push_to_hub=True)
    assert not (project.parent / "project-merged").exists()  # refused before any work


def test_merge_llm_adapter_token_only_for_the_call(monkeypatch, tmp_path):
    import merger.api

    seen = {}

    def fake_merge(base, adapter, out, **options):
        seen.update(token=os.environ.get("HF_TOKEN"), out=out, options=options)
        return "result"

    monkeypatch.setenv("HF_TOKEN", "the user's own")
    monkeypatch.setattr(merger.api, "merge_adapter", fake_merge)
    assert merge_llm_adapter("owner/base", "owner/my-lora", token="hf_call") == "result"
    assert seen == {"token": "hf_call", "out": Path.cwd() / "my-lora-merged", "options": {"pad_to_multiple_of": None, "quiet": True}}
    assert os.environ["HF_TOKEN"] == "the user's own"


def test_default_output_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert autotrain.default_output_folder("owner/name") == tmp_path / "name-merged"  # a Hub id: beside the caller
    (tmp_path / "runs" / "lora").mkdir(parents=True)
    assert autotrain.default_output_folder("runs/lora/") == tmp_path / "runs" / "lora-merged"
    monkeypatch.chdir(tmp_path / "runs" / "lora")
    assert autotrain.default_output_folder(".") == tmp_path / "runs" / "lora-merged"
