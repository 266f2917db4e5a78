"""Which tokenizer OUT gets, from the folders users really have: a full one, a partial one (only
added_tokens.json), a processor chat template that lives in the base, a --tokenizer folder that is
not there, and a base whose own tokenizer already has ids past its rows (Gemma 3)."""

import json
import shutil

import pytest

from merger import InputNotFoundError, inspect_adapter, merge_adapter
from merger.cli import main
from merger.demo import NEW_TOKENS


@pytest.mark.parametrize("given", ["nowhere", "empty"])
def test_a_tokenizer_folder_that_is_not_one_is_refused(copies, tmp_path, capsys, given):
    base, adapter = copies
    folder = tmp_path / given
    if given == "empty":
        folder.mkdir()
    out = tmp_path / "out"
    code = main(["--base", str(base), "--adapter", str(adapter), "--out", str(out), "--tokenizer", str(folder)])
    err = capsys.readouterr().err.strip()
    expected = "no such folder" if given == "nowhere" else "the folder has no tokenizer files"
    assert code == 2 and err.startswith(f"error: --tokenizer {folder}: {expected}") and len(err.splitlines()) == 1
    assert not out.exists()
    with pytest.raises(InputNotFoundError):
        inspect_adapter(base, adapter, tokenizer=str(folder))


def test_only_added_tokens_json_beside_the_adapter(copies, tmp_path):
    from transformers import AutoTokenizer

    base, adapter = copies
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (adapter / name).unlink(missing_ok=True)
    (adapter / "added_tokens.json").write_text(json.dumps({t: 64 + i for i, t in enumerate(NEW_TOKENS)}))
    result = merge_adapter(base, adapter, tmp_path / "out")
    assert "without a vocabulary" in result.plan.tokenizer_reason
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert len(tok) == 67 and tok.convert_tokens_to_ids(NEW_TOKENS) == [64, 65, 66]


def test_the_bases_processor_chat_template_is_kept(copies, tmp_path):
    base, adapter = copies
    template = {"chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}
    (base / "chat_template.json").write_text(json.dumps(template))
    (adapter / "chat_template.jinja").unlink()
    config = json.loads((adapter / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (adapter / "tokenizer_config.json").write_text(json.dumps(config))
    merge_adapter(base, adapter, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "chat_template.json").read_text()) == template


def test_the_adapters_chat_template_wins_over_the_bases(copies, tmp_path):
    base, adapter = copies
    (base / "chat_template.json").write_text(json.dumps({"chat_template": "base"}))
    merge_adapter(base, adapter, tmp_path / "out")
    assert not (tmp_path / "out" / "chat_template.json").exists()
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == (adapter / "chat_template.jinja").read_text()


def test_ids_the_base_tokenizer_already_had_past_its_rows_grow_nothing(tmp_path):
    # Gemma 3's text models: the tokenizer has 262145 ids, the embedding 262144 rows (the image
    # soft token has no row); a plain LoRA saved with that same tokenizer must not grow the model
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaForCausalLM

    from .factories import llama_config, make_tokenizer, perturb_trainable

    base, adapter = tmp_path / "base", tmp_path / "adapter"
    LlamaForCausalLM(llama_config(64, tied=True)).save_pretrained(base)
    tok = make_tokenizer(64)
    tok.add_special_tokens({"additional_special_tokens": ["<image_soft_token>"]})  # id 64: no row
    tok.save_pretrained(base)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    perturb_trainable(model, seed=0)
    model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(base).save_pretrained(adapter)

    result = merge_adapter(base, adapter, tmp_path / "out")
    assert result.plan.embed.rows == 64 and not result.plan.problems
    assert result.plan.embed.story == ("embed_tokens: 64 rows kept (65 tokens, as in the base's own tokenizer: ids 64 "
                                       "have no row in the base either, and training added none)")
    assert result.validation.ok and "tokenizer ids 64 have no row, as in the base itself" in result.validation.checks


def named_layout(adapter):
    """What save_pretrained does for get_peft_model(..., adapter_name="sft"): DIR/sft/ holds the
    adapter; the trainer saves the tokenizer to DIR."""
    (adapter / "sft").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        if (adapter / name).exists():
            (adapter / name).rename(adapter / "sft" / name)


@pytest.mark.parametrize("given", ["DIR", "DIR/sft"])
def test_a_named_adapter_and_the_tokenizer_saved_beside_it(copies, tmp_path, given):
    from transformers import AutoTokenizer

    base, adapter = copies
    named_layout(adapter)
    result = merge_adapter(base, adapter if given == "DIR" else adapter / "sft", tmp_path / "out")
    assert result.plan.adapter.folder == adapter / "sft" and result.plan.tokenizer_source == str(adapter)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert len(tok) == 67 and tok.chat_template


def test_several_named_adapters_are_named_for_the_user(copies, tmp_path, capsys):
    base, adapter = copies
    named_layout(adapter)
    shutil.copytree(adapter / "sft", adapter / "dpo")
    code = main(["--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == (f"error: --adapter {adapter}: holds 2 adapters in subfolders (dpo, sft); "
                                 f"pass one of them, e.g. --adapter {adapter / 'dpo'}")
