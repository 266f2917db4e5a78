"""inspect: the numbers it reports on a known pair, and its pinned JSON schema."""

import json

import pytest

from merger import inspect_adapter
from merger.cli import main
from merger.demo import build_demo_pair

SCHEMA_KEYS = {
    "schema_version", "base", "adapter", "model_class", "adapter_type", "embed", "head", "added_tokens",
    "tie_word_embeddings", "dtype", "operations", "lora_modules", "config_edits", "tokenizer", "notes",
    "stream_blockers", "problems", "outputs", "estimates", "peft_type", "modules_merged_by_peft", "stages",
}
SIDE_KEYS = {"rows", "base_rows", "tokenizer_len", "source", "story", "untrained_new_rows", "padding_rows"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build_demo_pair(tmp_path_factory.mktemp("inspect"))


def test_inspect_json_numbers_and_schema(pair, capsys):
    base, adapter = pair
    assert main(["inspect", "--base", str(base), "--adapter", str(adapter), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == SCHEMA_KEYS and data["schema_version"] == 1
    assert set(data["embed"]) == SIDE_KEYS and set(data["head"]) == SIDE_KEYS
    assert (data["embed"]["rows"], data["embed"]["base_rows"], data["embed"]["tokenizer_len"]) == (80, 64, 67)
    assert data["embed"]["untrained_new_rows"] == [] and data["embed"]["source"] == "adapter"
    assert data["embed"]["padding_rows"] == [67, 79]
    assert [(t["id"], t["token"], t["row_trained"]) for t in data["added_tokens"]] == [
        (64, "<|im_start|>", True), (65, "<|im_end|>", True), (66, "<tool>", True)]
    assert data["operations"] == {"copied": 11, "lora-merged": 8, "replaced": 2}
    assert data["config_edits"] == {"vocab_size": 80, "dtype": "float32"}
    assert data["tie_word_embeddings"] is False and data["problems"] == []
    assert data["estimates"]["disk_bytes"] > 0


def test_inspect_text_explains_the_peft_failure(pair, capsys):
    base, adapter = pair
    assert main(["inspect", "--base", str(base), "--adapter", str(adapter)]) == 0
    text = capsys.readouterr().out
    assert "embed_tokens: 80 rows = 67 tokens padded to a multiple of 16 (base: 64), from the adapter's tensors" in text
    assert "plain PEFT fails on this pair (size mismatch: the adapter's 80 rows vs the base's 64)" in text
    assert "engine (auto): stream" in text
    assert "rows 67-79 are padding: no token uses them (pad_to_multiple_of)" in text


def test_inspect_writes_nothing(pair, tmp_path):
    base, adapter = pair
    before = {p: p.stat().st_mtime_ns for folder in pair for p in folder.iterdir()}
    plan = inspect_adapter(base, adapter)
    assert plan.embed.rows == 80
    assert {p: p.stat().st_mtime_ns for folder in pair for p in folder.iterdir()} == before


def test_inspect_reports_problems_with_exit_2(pair, tmp_path, capsys):
    import shutil

    base, adapter = pair
    bad = tmp_path / "adapter"
    shutil.copytree(adapter, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "c_attn"]
    (bad / "adapter_config.json").write_text(json.dumps(config))
    # a tokenizer claiming more ids than the adapter's matrices have
    tok = json.loads((bad / "tokenizer.json").read_text())
    tok["added_tokens"].append({"id": 85, "content": "<late>", "special": True, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False})
    (bad / "tokenizer.json").write_text(json.dumps(tok))
    assert main(["inspect", "--base", str(base), "--adapter", str(bad)]) == 2
    text = capsys.readouterr().out
    assert "note: target_modules entries that match nothing in the base: c_attn" in text
    assert "problem: the adapter's tokenizer has ids up to 85 but embed_tokens has 80 rows: ids 80-85 would index past the matrix" in text


@pytest.mark.parametrize("scenario", ["qwen_padded_base"], indirect=True)
def test_tokens_added_inside_a_padded_base_are_listed(scenario, capsys):
    # Qwen2-style: 96 rows for 80 tokens; <|im_start|>/<|im_end|> take ids 80, 81 inside the spare
    # rows, and LoRA on attention alone trains no embedding row
    assert main(["inspect", "--base", str(scenario.base_dir), "--adapter", str(scenario.adapter_dir), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(t["id"], t["token"], t["row_trained"]) for t in data["added_tokens"]] == [
        (80, "<|im_start|>", False), (81, "<|im_end|>", False)]
    assert data["embed"]["rows"] == data["embed"]["base_rows"] == 96
