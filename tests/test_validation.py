"""Validation catches each way a merged checkpoint goes wrong, each with its own finding."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from merger import ValidationFailedError, merge_adapter, validate_checkpoint
from merger.cli import main
from merger.demo import build_demo_pair


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    base, adapter = build_demo_pair(root, tied=True)
    result = merge_adapter(base, adapter, root / "out", validate="fast")
    assert result.validation.ok and result.plan.tie_word_embeddings is False
    return base, adapter, result.out


@pytest.fixture
def broken(merged, tmp_path):
    base, adapter, out = merged
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    return base, adapter, copy


def findings(out, base, adapter, mode="fast"):
    report = validate_checkpoint(out, base, adapter, mode=mode)
    return {f.code for f in report.findings}, report


def edit_weights(out, change):
    path = out / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_config(out, change):
    config = json.loads((out / "config.json").read_text())
    change(config)
    (out / "config.json").write_text(json.dumps(config))


def test_a_good_merge_validates_full(merged):
    base, adapter, out = merged
    codes, report = findings(out, base, adapter, mode="full")
    assert codes == set() and report.metrics["logits_checked"] is True
    assert report.metrics["max_rel_error_logits"] < 1e-4
    assert report.metrics["modules_checked"] == 8


def test_dropped_tensor(broken):
    base, adapter, out = broken
    edit_weights(out, lambda t: t.pop("model.layers.1.self_attn.o_proj.weight"))
    codes, report = findings(out, base, adapter)
    assert codes == {"missing-tensor"}
    assert "model.layers.1.self_attn.o_proj.weight" in report.findings[0].message


def test_zeroed_new_token_rows(broken):
    base, adapter, out = broken
    edit_weights(out, lambda t: t["model.embed_tokens.weight"][64:].zero_())
    codes, report = findings(out, base, adapter)
    assert codes == {"new-rows-lost"}
    assert "model.embed_tokens.weight: rows 64-79" in report.findings[0].message


def test_stale_vocab_size(broken):
    base, adapter, out = broken
    edit_config(out, lambda c: c.update(vocab_size=64))
    codes, report = findings(out, base, adapter)
    assert codes == {"stale-vocab-size"}
    assert report.findings[0].message == "config.json vocab_size is 64 but the embedding has 80 rows"


def test_nan(broken):
    base, adapter, out = broken
    edit_weights(out, lambda t: t["model.norm.weight"].__setitem__(0, float("nan")))
    codes, _ = findings(out, base, adapter)
    assert codes == {"non-finite", "copy-differs"}  # the norm is copied from the base, so it also differs


def test_retied_diverged_head(broken):
    base, adapter, out = broken
    edit_weights(out, lambda t: t.pop("lm_head.weight"))
    edit_config(out, lambda c: c.update(tie_word_embeddings=True))
    codes, _ = findings(out, base, adapter)
    assert codes == {"missing-tensor", "wrong-tie-flag"}


def test_truncated_shard(broken):
    base, adapter, out = broken
    path = out / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    codes, report = findings(out, base, adapter)
    assert codes == {"unreadable-shard"} and "truncated" in report.findings[0].message


def test_base_tokenizer_instead_of_adapters(broken):
    base, adapter, out = broken
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (base / name).exists():
            shutil.copyfile(base / name, out / name)
    codes, report = findings(out, base, adapter)
    assert codes == {"wrong-tokenizer"}
    assert "has 64 tokens, the adapter's 67" in report.findings[0].message


def test_unmerged_save_with_lora_keys(broken):
    base, adapter, out = broken
    lora = load_file(adapter / "adapter_model.safetensors")
    edit_weights(out, lambda t: t.update({k.removeprefix("base_model.model."): v for k, v in lora.items() if "lora_" in k}))
    codes, _ = findings(out, base, adapter)
    assert codes == {"unmerged-adapter-key"}


def test_lost_lora_update(broken):
    base, adapter, out = broken
    base_q = load_file(base / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    edit_weights(out, lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.weight", base_q))
    codes, _ = findings(out, base, adapter)
    assert codes == {"lora-not-merged"}


def test_validate_cli_exit_codes(merged, broken, capsys):
    base, adapter, out = merged
    assert main(["validate", str(out), "--base", str(base), "--adapter", str(adapter)]) == 0
    _, _, bad = broken
    edit_config(bad, lambda c: c.update(vocab_size=64))
    capsys.readouterr()
    assert main(["validate", str(bad), "--base", str(base), "--adapter", str(adapter), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert [f["code"] for f in report["findings"]] == ["stale-vocab-size"]


def test_failed_validation_commits_nothing(merged, tmp_path, monkeypatch):
    """A merge whose output fails validation exits 1 and leaves an existing OUT exactly as it was."""
    base, adapter, _ = merged
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous merge")
    import merger.engines.stream as stream

    real = stream.run_op

    class ZeroNewRows:
        """An engine bug on purpose: rows 64+ of the embedding written as zeros."""

        def __init__(self, writer):
            self.writer, self.row = writer, 0

        def write(self, name, block):
            block = block.clone()
            block[max(0, 64 - self.row):] = 0
            self.row += block.shape[0]
            self.writer.write(name, block)

    def lose_new_rows(runner, op, writer):
        real(runner, op, ZeroNewRows(writer) if op.out_key == "model.embed_tokens.weight" else writer)

    monkeypatch.setattr(stream, "run_op", lose_new_rows)
    with pytest.raises(ValidationFailedError, match="new-token rows were lost") as info:
        merge_adapter(base, adapter, out, overwrite=True, engine="stream")
    assert info.value.exit_code == 1
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_validate_accepts_a_correct_merge_made_by_plain_peft(tmp_path):
    """A checkpoint from another tool is judged on its contents: PEFT 0.21 + transformers 5 unties
    the diverged head itself, and merger's full validation agrees with that merge."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, adapter = build_demo_pair(tmp_path / "pair", tied=True)
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(len(AutoTokenizer.from_pretrained(adapter)), pad_to_multiple_of=16)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(tmp_path / "by-peft")
    AutoTokenizer.from_pretrained(adapter).save_pretrained(tmp_path / "by-peft")
    codes, report = findings(tmp_path / "by-peft", base, adapter, mode="full")
    assert codes == set() and report.metrics["logits_checked"] is True
