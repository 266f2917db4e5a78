"""OUT is right for every reader: stop tokens, SentencePiece files, dtype, tie flags at every level,
hard-tied architectures, the readiness report, --repair on folders merged the naive way, the card."""

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from merger import merge_adapter, repair_checkpoint, validate_checkpoint
from merger.cli import main
from merger.metadata import generation_config
from merger.serving import check_folder, read_folder, readiness
from merger.tokenizer_facts import sentencepiece_size

from .factories import perturb_trainable

REAL = Path(__file__).resolve().parents[2] / "shared" / "real-data"


def problems_of(folder: Path) -> list[str]:
    return [p.message for p in check_folder(read_folder(folder))]


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def sentencepiece_model(pieces: list[str]) -> bytes:
    """A SentencePiece ModelProto with these pieces (field 1: piece, score, type), hand-encoded."""
    def varint(n: int) -> bytes:
        out = b""
        while True:
            byte, n = n & 0x7F, n >> 7
            out += bytes([byte | (0x80 if n else 0)])
            if not n:
                return out

    def field(number: int, payload: bytes) -> bytes:
        return varint(number << 3 | 2) + varint(len(payload)) + payload

    body = b""
    for i, piece in enumerate(pieces):
        entry = field(1, piece.encode()) + varint(2 << 3 | 5) + struct.pack("<f", -float(i)) + varint(3 << 3 | 0) + varint(1)
        body += field(1, entry)
    return body + field(2, b"\x08\x01")  # a trainer_spec, so more than pieces is parsed


@pytest.fixture
def merged(demo_pair, tmp_path):
    out = tmp_path / "out"
    merge_adapter(demo_pair[0], demo_pair[1], out, quiet=True)
    return demo_pair[0], demo_pair[1], out


# --------------------------------------------------------------------------- generation config

def test_stop_tokens_are_added_never_dropped():
    stops = ((2, "</s>", "the tokenizer's eos_token"), (65, "<|im_end|>", "ends a turn in the chat template"))
    updated, changes = generation_config({"eos_token_id": [2, 7], "temperature": 0.6}, {}, stops)
    assert updated == {"eos_token_id": [2, 7, 65], "temperature": 0.6} and len(changes) == 1 and "65 '<|im_end|>'" in changes[0]
    assert generation_config({"eos_token_id": [65, 2]}, {}, stops) == ({"eos_token_id": [65, 2]}, ())
    created, changes = generation_config(None, {"bos_token_id": 1, "eos_token_id": 2}, stops)
    assert created == {"bos_token_id": 1, "eos_token_id": [2, 65]} and changes[0] == "created from config.json's token ids"
    assert generation_config(None, {"eos_token_id": 2}, stops[:1]) == (None, ())  # nothing to add: no file made


def test_merge_adds_the_chat_end_of_turn_to_a_multi_eos_generation_config(copies, tmp_path):
    base, adapter = copies
    edit_json(base / "generation_config.json", lambda g: g.update(eos_token_id=[2, 5], top_p=0.9))
    out = tmp_path / "out"
    result = merge_adapter(base, adapter, out, quiet=True)
    written = json.loads((out / "generation_config.json").read_text())
    assert written["eos_token_id"] == [2, 5, 65] and written["top_p"] == 0.9  # key for key, one id added
    assert any("added 65 '<|im_end|>'" in line for line in result.plan.outputs.lines())
    report = json.loads((out / "merge_report.json").read_text())
    assert report["plan"]["outputs"]["generation_config"]["source"] == str(base / "generation_config.json")


def test_the_adapters_generation_config_still_wins(copies, tmp_path):
    base, adapter = copies
    (adapter / "generation_config.json").write_text(json.dumps({"eos_token_id": 65, "max_new_tokens": 12}))
    out = tmp_path / "out"
    merge_adapter(base, adapter, out, quiet=True)
    # the adapter's, key for key; the training tokenizer's eos_token (</s>) joins its eos list
    assert json.loads((out / "generation_config.json").read_bytes()) == {"eos_token_id": [65, 2], "max_new_tokens": 12}


# --------------------------------------------------------------------------------- config.json

def test_null_dtype_becomes_concrete_at_every_level(copies, tmp_path):
    base, adapter = copies
    edit_json(base / "config.json", lambda c: c.update(dtype=None, torch_dtype=None))
    out = tmp_path / "out"
    merge_adapter(base, adapter, out, quiet=True)
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32" and config["torch_dtype"] == "float32"


def test_tie_flag_is_written_at_both_levels_of_a_multimodal_config(scenario_cache, tmp_path):
    scenario = scenario_cache("llava_text_config")
    out = tmp_path / "out"
    merge_adapter(scenario.base_dir, scenario.adapter_dir, out, quiet=True)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] == config["text_config"]["tie_word_embeddings"] == scenario.expect_tied
    assert all(row["ok"] for row in json.loads((out / "merge_report.json").read_text())["serving"])


def test_a_tie_flag_at_one_level_only_is_not_ready(merged):
    _, _, out = merged
    edit_json(out / "config.json", lambda c: c.update(text_config={"model_type": "llama", "tie_word_embeddings": True}))
    assert any("tie_word_embeddings differs between levels" in p for p in problems_of(out))


# ---------------------------------------------------------------------------- hard-tied heads

def test_a_trained_gemma_head_is_said_to_be_ignored_by_vllm_sglang_and_llama_cpp(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import GemmaConfig, GemmaForCausalLM

    from merger.demo import build_tokenizer

    torch.manual_seed(0)
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    GemmaForCausalLM(GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, head_dim=16)).save_pretrained(base)
    build_tokenizer().save_pretrained(base)
    model = get_peft_model(GemmaForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    perturb_trainable(model, seed=0)
    model.save_pretrained(adapter)
    result = merge_adapter(base, adapter, tmp_path / "out", quiet=True)
    assert any("vLLM and SGLang always serve gemma with the head tied" in note for note in result.plan.notes)
    rows = {row["reader"]: row for row in result.validation.serving}
    for reader in ("vLLM", "SGLang", "llama.cpp converter"):
        assert rows[reader]["ok"] and rows[reader]["problems"][0]["severity"] == "warning"
    assert rows["transformers"]["problems"] == []


# ------------------------------------------------------------------------------ SentencePiece

def test_sentencepiece_size_counts_pieces():
    assert sentencepiece_size_of(sentencepiece_model([f"p{i}" for i in range(10)])) == 10
    assert sentencepiece_size_of(b"not a model at all \xff\xff") is None


def sentencepiece_size_of(data: bytes) -> int | None:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".model") as handle:
        handle.write(data)
        handle.flush()
        return sentencepiece_size(Path(handle.name))


def test_a_sentencepiece_base_gets_its_model_beside_a_tokenizer_json_only_tokenizer(copies, tmp_path):
    """transformers 5 saves tokenizer.json but no tokenizer.model: llama.cpp's converter then
    writes len(tokenizer) tokens for a padded embedding and llama.cpp refuses the file."""
    from merger.demo import WORDS

    base, adapter = copies
    model = sentencepiece_model(WORDS)
    (base / "tokenizer.model").write_bytes(model)
    edit_json(adapter / "tokenizer.json", lambda t: t["model"].update(byte_fallback=True))  # as a SentencePiece conversion is
    out = tmp_path / "out"
    result = merge_adapter(base, adapter, out, quiet=True)
    assert (out / "tokenizer.model").read_bytes() == model
    assert json.loads((out / "added_tokens.json").read_text()) == {"<|im_start|>": 64, "<|im_end|>": 65, "<tool>": 66}
    # llama.cpp's converter reads the special flag of tokens past the SentencePiece model only here
    decoder = json.loads((out / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert {i: (decoder[i]["content"], decoder[i]["special"]) for i in ("64", "65", "66")} == {
        "64": ("<|im_start|>", True), "65": ("<|im_end|>", True), "66": ("<tool>", True)}
    assert "the base's (64 pieces) is written beside it, with added_tokens.json for the 3 tokens past it" in result.plan.outputs.sentencepiece_reason
    from transformers import AutoTokenizer

    before, after = AutoTokenizer.from_pretrained(adapter), AutoTokenizer.from_pretrained(out)
    text = "<|im_start|> w3 w4 <|im_end|> <tool>"
    assert len(after) == len(before) and after(text)["input_ids"] == before(text)["input_ids"]
    assert all(row["ok"] for row in result.validation.serving)

    config = json.loads((out / "tokenizer_config.json").read_text())
    del config["added_tokens_decoder"]  # as transformers 5 writes it
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    llama = readiness(check_folder(read_folder(out)))[-1]
    assert not llama["ok"] and "have no added_tokens_decoder entry" in llama["problems"][0]["message"]
    assert any("added_tokens_decoder entries" in line for line in repair_checkpoint(out, base))
    assert all(row["ok"] for row in readiness(check_folder(read_folder(out))))

    (out / "tokenizer.model").unlink()  # what a plain save leaves: the converter cannot read it right
    llama = readiness(check_folder(read_folder(out)))[-1]
    assert not llama["ok"] and "a SentencePiece vocabulary without tokenizer.model" in llama["problems"][0]["message"]
    assert "(67 tokens for 80 rows: llama.cpp refuses the file)" in llama["problems"][0]["message"]


def test_a_replaced_vocabulary_does_not_get_the_bases_sentencepiece_model(copies, tmp_path):
    base, adapter = copies
    (base / "tokenizer.model").write_bytes(sentencepiece_model([f"p{i}" for i in range(40)]))
    out = tmp_path / "out"
    result = merge_adapter(base, adapter, out, quiet=True)
    assert not (out / "tokenizer.model").exists()
    assert "not written: the tokenizer's own vocabulary has 64 pieces, the base's SentencePiece model 40" in result.plan.outputs.sentencepiece_reason


@pytest.mark.skipif(not (REAL / "tokenizers" / "llama2-7b-chat").is_dir(), reason="needs ../shared/real-data")
def test_real_llama2_sentencepiece_model_is_counted():
    assert sentencepiece_size(REAL / "tokenizers" / "llama2-7b-chat" / "tokenizer.model") == 32000
    assert sentencepiece_size(REAL / "tokenizers" / "mistral-sentencepiece" / "mistral_instruct_tokenizer_240323.model.v3") == 32768


# ------------------------------------------------------------------ --repair on naive merges

def naive_merge(scenario, out: Path) -> None:
    """What users do by hand: resize, load the adapter with PEFT, merge_and_unload, save_pretrained."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(scenario.base_dir)
    model.resize_token_embeddings(scenario.expect_embed_rows, mean_resizing=False)
    merged = PeftModel.from_pretrained(model, scenario.adapter_dir).merge_and_unload()
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(scenario.adapter_dir).save_pretrained(out)


def weights_bytes(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.glob("*.safetensors")}


def test_repair_fixes_the_metadata_of_a_naive_merge_and_never_the_weights(scenario_cache, tmp_path, capsys):
    scenario = scenario_cache("llamafactory_pad64")
    out = tmp_path / "naive"
    naive_merge(scenario, out)
    # what other tools leave behind: a stale vocab_size, a null dtype, the base's single eos
    edit_json(out / "config.json", lambda c: c.update(vocab_size=scenario.tokenizer_len, dtype=None))
    edit_json(out / "generation_config.json", lambda g: g.update(eos_token_id=7))
    before = weights_bytes(out)
    assert main(["validate", str(out)]) == 1
    assert "NOT READY" in capsys.readouterr().out

    code = main(["validate", str(out), "--repair", "--base", str(scenario.base_dir), "--adapter", str(scenario.adapter_dir)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert f"repaired: config.json vocab_size: {scenario.tokenizer_len} -> {scenario.expect_embed_rows}" in text
    assert "repaired: config.json dtype: None -> 'float32'" in text
    assert "repaired: generation_config.json: eos_token_id [7] -> [7, 2]: added 2 '</s>' (the tokenizer's eos_token)" in text
    assert "validation fast:" in text and "serving: transformers ok · vLLM ok" in text
    assert weights_bytes(out) == before
    assert repair_checkpoint(out, scenario.base_dir) == []  # a second repair finds nothing to do
    assert not list(tmp_path.glob(".naive.*")) and not list(out.glob(".*repair-tmp"))


def test_validate_says_when_the_weights_themselves_are_wrong(scenario_cache, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    scenario = scenario_cache("llamafactory_pad64")
    out = tmp_path / "naive"
    naive_merge(scenario, out)
    name = next(p for p in out.glob("*.safetensors"))
    tensors = load_file(name)
    key = next(k for k in tensors if "q_proj" in k)
    tensors[key] = tensors[key] * 0  # the adapter never made it into this module
    save_file(tensors, name, metadata={"format": "pt"})
    code = main(["validate", str(out), "--repair", "--base", str(scenario.base_dir), "--adapter", str(scenario.adapter_dir)])
    assert code == 1 and "lora-not-merged" in capsys.readouterr().out


def test_repair_brings_the_tokenizer_from_the_base_when_the_folder_has_none(merged, tmp_path):
    base, _, out = merged
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (out / name).unlink()
    lines = repair_checkpoint(out, base)
    assert any(line.startswith("tokenizer.json, tokenizer_config.json: copied from") for line in lines)
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()


def test_validate_json_has_serving_and_repairs(merged, capsys):
    _, _, out = merged
    assert main(["validate", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ready"] is True and data["repaired"] == [] and [r["reader"] for r in data["serving"]] == [
        "transformers", "vLLM", "SGLang", "TGI", "llama.cpp converter"]


# --------------------------------------------------------------------------------- model card

def test_the_model_card_has_hub_metadata_and_the_merge_story(copies, tmp_path):
    import yaml

    base, adapter = copies
    edit_json(adapter / "adapter_config.json", lambda c: c.update(base_model_name_or_path="owner/tiny-base"))
    (adapter / "README.md").write_text("---\nlibrary_name: peft\nlicense: apache-2.0\ndatasets:\n- owner/chats\n---\n# my adapter\n")
    out = tmp_path / "out"
    merge_adapter(base, adapter, out, quiet=True)
    text = (out / "README.md").read_text()
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["base_model"] == "owner/tiny-base" and meta["base_model_relation"] == "finetune"
    assert meta["library_name"] == "transformers" and meta["license"] == "apache-2.0" and meta["datasets"] == ["owner/chats"]
    assert "embed_tokens: 80 rows = 67 tokens padded to a multiple of 16" in text
    assert "| 65 | `<\\|im_end\\|>` | True | True |" in text
    sha = json.loads((out / "merge_report.json").read_text())["inputs"]["sha256"]["base"]["model.safetensors"]
    assert sha in text and "## Serving readiness" in text and "| vLLM | yes | - |" in text


def test_a_local_base_gets_no_base_model_key(merged):
    import yaml

    _, _, out = merged
    meta = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert "base_model" not in meta  # a local path is not a Hub id: the Hub would reject the card's metadata


def test_repair_does_not_bring_a_sentencepiece_model_of_another_vocabulary(merged, tmp_path):
    base, _, out = merged
    other = tmp_path / "other-base"
    shutil.copytree(base, other)
    (other / "tokenizer.model").write_bytes(sentencepiece_model([f"p{i}" for i in range(40)]))
    edit_json(out / "tokenizer.json", lambda t: t["model"].update(byte_fallback=True))
    lines = repair_checkpoint(out, other)
    assert any(line.startswith("tokenizer.model: not copied from") and "has 64 pieces, the base's SentencePiece model 40" in line
               for line in lines)
    assert not (out / "tokenizer.model").exists()
