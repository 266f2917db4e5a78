"""merge-adapter gguf: the pure vocabulary checks, the read-back of GGUF files written here with
gguf.GGUFWriter next to a folder merged by merger, the converter's wiring (a stand-in script), and,
when MERGER_LLAMA_CPP names a llama.cpp source folder, llama.cpp's own convert_hf_to_gguf.py."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from merger.cli import main

from .factories import perturb_trainable
from merger.gguf import (BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED, GgufFacts, ModelFacts, check_gguf,
                         compare_facts, pick_embedding, read_gguf_facts, read_model_facts)
from merger.llama_cpp import default_outfile, last_error_line


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------- (a) the pure checks, on hand-made facts

WORDS = ["<unk>", "<s>", "</s>", "a", "b", "c", "<|im_start|>", "<tool>"]
ADDED = ((0, "<unk>", True), (1, "<s>", True), (2, "</s>", True), (6, "<|im_start|>", True), (7, "<tool>", False))
TYPES = (UNKNOWN, CONTROL, CONTROL, NORMAL, NORMAL, NORMAL, CONTROL, USER_DEFINED, UNUSED, UNUSED)
TOKENS = tuple(WORDS) + ("[PAD8]", "[PAD9]")


def gguf_facts(**changes) -> GgufFacts:
    values = dict(path="/x/m.gguf", tokens=TOKENS, token_types=TYPES, bos_id=1, eos_id=2, embedding_shape=(10, 4))
    values.update(changes)
    return GgufFacts(**values)


def model_facts(**changes) -> ModelFacts:
    values = dict(folder="merged", embedding="model.embed_tokens.weight", embedding_shape=(10, 4), added_tokens=ADDED,
                  bos=(("tokenizer_config.json bos_token '<s>'", (1,)),),
                  eos=(("tokenizer_config.json eos_token '</s>'", (2,)), ("generation_config.json eos_token_id", (2, 6))))
    values.update(changes)
    return ModelFacts(**values)


def by_name(checks) -> dict:
    return {c.name: c for c in checks}


def failed(checks) -> list[str]:
    return [c.code for c in checks if c.status == "FAIL"]


def test_matching_facts_pass_every_check():
    checks = compare_facts(gguf_facts(), model_facts())
    assert [(c.name, c.status) for c in checks] == [
        ("token count", "ok"), ("added tokens", "ok"), ("added token types", "ok"),
        ("bos id", "ok"), ("eos id", "ok"), ("token_embd.weight", "ok")]
    rows = by_name(checks)
    assert rows["token count"].message == "10 tokens = 10 rows of model.embed_tokens.weight"
    assert rows["added token types"].message == "4 special = CONTROL, 1 non-special = USER_DEFINED"
    assert rows["eos id"].message == "2 (tokenizer_config.json eos_token '</s>', generation_config.json eos_token_id)"


def test_fewer_tokens_than_rows_is_the_32002_vs_32064_finding():
    checks = compare_facts(gguf_facts(tokens=TOKENS[:8], token_types=TYPES[:8]), model_facts())
    assert failed(checks) == ["wrong-token-count"]
    message = by_name(checks)["token count"].message
    assert message.startswith("m.gguf has 8 tokens, merged's model.embed_tokens.weight 10 rows (expected 10 tokens): "
                              "the converter counted the tokenizer's 8 tokens, not the 10 rows")
    assert "token_embd.weight has wrong shape" in message


def test_more_tokens_than_rows_and_no_tokens_at_all():
    more = compare_facts(gguf_facts(tokens=TOKENS + ("x",), token_types=TYPES + (NORMAL,)), model_facts())
    assert failed(more) == ["wrong-token-count"] and "ids 10 and up have no embedding row" in by_name(more)["token count"].message
    other = by_name(compare_facts(gguf_facts(tokens=TOKENS[:8], embedding_shape=(8, 4)), model_facts()))["token count"]
    assert other.message.endswith("(expected 10 tokens): this GGUF was not converted from merged; convert it again")
    none = by_name(compare_facts(gguf_facts(tokens=None), model_facts()))
    assert none["token count"].code == "wrong-token-count" and "has no tokenizer.ggml.tokens" in none["token count"].message


def test_an_added_token_left_as_padding_or_past_the_end():
    tokens = list(TOKENS)
    tokens[6] = "[PAD6]"
    checks = by_name(compare_facts(gguf_facts(tokens=tuple(tokens)), model_facts()))
    assert checks["added tokens"].code == "wrong-added-token"
    assert checks["added tokens"].message.startswith("1 of 5 added tokens differ in m.gguf: id 6 holds '[PAD6]' where the "
                                                     "tokenizer has '<|im_start|>'; the converter left them as padding")
    assert checks["added tokens"].message.endswith("list them in tokenizer_config.json's added_tokens_decoder, as "
                                                   "transformers 4 saved them, then convert again")
    # the token with the wrong text is one finding, not two
    assert checks["added token types"].status == "ok"
    assert checks["added token types"].message.endswith("(1 with the wrong text not checked)")
    past = compare_facts(gguf_facts(), model_facts(added_tokens=ADDED + ((12, "<new>", True),)))
    assert "id 12 '<new>' is past the GGUF's 10 tokens" in by_name(past)["added tokens"].message


def test_a_non_special_sentencepiece_space_is_written_as_a_space():
    tokens = list(TOKENS)
    tokens[7] = " tool"
    checks = compare_facts(gguf_facts(tokens=tuple(tokens)), model_facts(added_tokens=ADDED[:4] + ((7, "\u2581tool", False),)))
    assert failed(checks) == []


@pytest.mark.parametrize(("index", "kind", "expected"), [
    (6, USER_DEFINED, "id 6 '<|im_start|>': USER_DEFINED, expected CONTROL (special in the tokenizer)"),
    (1, NORMAL, "id 1 '<s>': NORMAL, expected CONTROL (special in the tokenizer)"),
    (7, CONTROL, "id 7 '<tool>': CONTROL, expected USER_DEFINED (not special in the tokenizer)"),
    (7, BYTE, "id 7 '<tool>': BYTE, expected USER_DEFINED (not special in the tokenizer)"),
])
def test_a_wrong_token_type_fails(index, kind, expected):
    types = list(TYPES)
    types[index] = kind
    checks = by_name(compare_facts(gguf_facts(token_types=tuple(types)), model_facts()))
    assert checks["added token types"].code == "wrong-token-type"
    assert checks["added token types"].message.startswith(f"1 added tokens of m.gguf have the wrong type: {expected}; ")


def test_llama_cpp_types_look_special_tokens_control_and_says_so():
    added = ADDED[:3] + ((6, "<|im_start|>", False), (7, "<tool>", False))
    checks = by_name(compare_facts(gguf_facts(), model_facts(added_tokens=added)))
    assert checks["added token types"].status == "ok"
    assert "1 non-special typed CONTROL by llama.cpp's rule for tokens that look special ('<|im_start|>')" in checks["added token types"].message
    assert by_name(compare_facts(gguf_facts(token_types=None), model_facts()))["added token types"].code == "wrong-token-type"
    short_types = by_name(compare_facts(gguf_facts(token_types=TYPES[:9]), model_facts()))["added token types"]
    assert short_types.message == "m.gguf has 9 token types for 10 tokens; convert it again"


def test_bos_and_eos_ids():
    wrong_bos = by_name(compare_facts(gguf_facts(bos_id=0), model_facts()))["bos id"]
    assert wrong_bos.code == "wrong-bos-id"
    assert wrong_bos.message.startswith("m.gguf has bos id 0 ('<unk>'), but tokenizer_config.json bos_token '<s>' says 1: ")
    # generation_config.json may list several ids: the GGUF's must be one of them, and the tokenizer_config's
    eos = by_name(compare_facts(gguf_facts(eos_id=6), model_facts()))["eos id"]
    assert eos.code == "wrong-eos-id" and "tokenizer_config.json eos_token '</s>' says 2" in eos.message
    assert "generation_config.json eos_token_id says" not in eos.message
    assert eos.message.endswith("; set it in place with llama.cpp's gguf-py/gguf/scripts/gguf_set_metadata.py m.gguf "
                                "tokenizer.ggml.eos_token_id 2")
    apart = by_name(compare_facts(gguf_facts(), model_facts(eos=(("tokenizer_config.json eos_token '</s>'", (2,)),
                                                                  ("generation_config.json eos_token_id", (6,))))))["eos id"]
    assert apart.message.endswith("the folder's own files disagree: make them agree, then convert again")
    missing = by_name(compare_facts(gguf_facts(eos_id=None), model_facts()))["eos id"]
    assert missing.message.startswith("m.gguf has no tokenizer.ggml.eos_token_id; the folder sets 2 / [2, 6] (")
    unset = by_name(compare_facts(gguf_facts(bos_id=None), model_facts(bos=())))["bos id"]
    assert (unset.status, unset.message) == ("skip", "the folder sets no bos token")


def test_embedding_shape():
    checks = by_name(compare_facts(gguf_facts(embedding_shape=(10, 8)), model_facts()))
    assert checks["token_embd.weight"].code == "wrong-embedding-shape"
    assert checks["token_embd.weight"].message.startswith("m.gguf's token_embd.weight is [10, 8], merged's model.embed_tokens.weight [10, 4]")
    assert by_name(compare_facts(gguf_facts(embedding_shape=None), model_facts()))["token_embd.weight"].code == "wrong-embedding-shape"


def test_no_added_tokens_skips_those_checks():
    checks = by_name(compare_facts(gguf_facts(), model_facts(added_tokens=())))
    assert checks["added tokens"].status == checks["added token types"].status == "skip"


def test_pick_embedding_prefers_the_text_model_with_vocab_size_rows():
    shapes = {"model.embed_tokens.weight": (80, 32), "model.vision_tower.embed_tokens.weight": (80, 16),
              "lm_head.weight": (80, 32), "model.language_model.embed_tokens.weight": (96, 32)}
    assert pick_embedding(shapes, 96) == "model.language_model.embed_tokens.weight"
    assert pick_embedding(shapes, None) == "model.embed_tokens.weight"
    assert pick_embedding({"transformer.wte.weight": (5, 2)}, 7) == "transformer.wte.weight"
    assert pick_embedding({"lm_head.weight": (5, 2)}, 5) is None


def test_last_error_line_of_the_converter():
    traceback = ["INFO:hf-to-gguf:Loading model: m", "Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
                 "NotImplementedError: BPE pre-tokenizer was not recognized - update get_vocab_base_pre()", ""]
    assert last_error_line(traceback) == "NotImplementedError: BPE pre-tokenizer was not recognized - update get_vocab_base_pre()"
    assert last_error_line(["INFO:x:y", "ERROR:hf-to-gguf:Model Foo is not supported", "done"]) == "ERROR:hf-to-gguf:Model Foo is not supported"
    assert last_error_line(["usage: convert_hf_to_gguf.py [-h]", "convert_hf_to_gguf.py: error: argument --outtype: invalid choice: 'auto'"]) \
        == "convert_hf_to_gguf.py: error: argument --outtype: invalid choice: 'auto'"
    assert last_error_line(["Killed"]) == "Killed"
    assert last_error_line([]) == "no output"


def test_default_outfile_is_beside_the_folder():
    assert default_outfile("out/merged", "f16") == Path("out/merged-f16.gguf")
    assert default_outfile("out/merged/", "auto") == Path("out/merged.gguf")


# ---------------------------------------------------------------- (b) GGUF files written here, next to a merged folder


@pytest.fixture(scope="module")
def merged(demo_pair, tmp_path_factory):
    from merger import merge_adapter

    out = tmp_path_factory.mktemp("gguf") / "merged"
    merge_adapter(demo_pair[0], demo_pair[1], out, quiet=True)
    return out


def demo_vocabulary(count: int) -> tuple[list[str], list[int]]:
    """The merged demo's tokens as llama.cpp's converter writes them: 64 words, 3 added special tokens,
    [PAD] tokens up to the 80 rows."""
    from merger.demo import NEW_TOKENS, WORDS as DEMO_WORDS

    tokens = DEMO_WORDS + NEW_TOKENS + [f"[PAD{i}]" for i in range(67, 80)]
    types = [UNKNOWN, CONTROL, CONTROL] + [NORMAL] * 61 + [CONTROL] * 3 + [UNUSED] * 13
    return tokens[:count], types[:count]


def write_gguf(path: Path, tokens: list[str] | None, types: list[int] | None, bos: int | None = 1, eos: int | None = 2,
               embedding: tuple[int, int] | None = (80, 32)) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    if tokens is not None:
        writer.add_token_list(tokens)
    if types is not None:
        writer.add_token_types(types)
    if bos is not None:
        writer.add_bos_token_id(bos)
    if eos is not None:
        writer.add_eos_token_id(eos)
    if embedding is not None:
        writer.add_tensor("token_embd.weight", np.zeros(embedding, dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_merged_folder_facts(merged):
    facts = read_model_facts(merged)
    assert (facts.embedding, facts.embedding_shape) == ("model.embed_tokens.weight", (80, 32))
    assert [(i, c, s) for i, c, s in facts.added_tokens][-3:] == [(64, "<|im_start|>", True), (65, "<|im_end|>", True), (66, "<tool>", True)]
    assert facts.bos == (("tokenizer_config.json bos_token '<s>'", (1,)), ("generation_config.json bos_token_id", (1,)))
    # generation_config.json may list more stop ids (a chat template's end of turn): the GGUF's eos must be among them
    assert facts.eos[0] == ("tokenizer_config.json eos_token '</s>'", (2,))
    assert facts.eos[1][0] == "generation_config.json eos_token_id" and 2 in facts.eos[1][1]


def test_a_gguf_written_here_reads_back(merged, tmp_path):
    tokens, types = demo_vocabulary(80)
    facts = read_gguf_facts(write_gguf(tmp_path / "m.gguf", tokens, types))
    assert (len(facts.tokens), facts.tokens[64], facts.token_types[64], facts.bos_id, facts.eos_id, facts.embedding_shape) \
        == (80, "<|im_start|>", CONTROL, 1, 2, (80, 32))
    report = check_gguf(tmp_path / "m.gguf", merged)
    assert report.ok, report


def test_a_gguf_with_fewer_tokens_than_rows_fails_on_the_cli(merged, tmp_path, capsys):
    tokens, types = demo_vocabulary(67)  # len(tokenizer), not the 80 rows the embedding was padded to
    path = write_gguf(tmp_path / "short.gguf", tokens, types)
    assert main(["gguf", str(merged), "--check", str(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"gguf {path} against {merged}: 6 checks, 1 FAILED"
    assert out[1].startswith("  FAIL [wrong-token-count]: token count: short.gguf has 67 tokens, "
                             f"{merged}'s model.embed_tokens.weight 80 rows (expected 80 tokens)")
    assert out[2:] == ["  ok: added tokens: 6 at their ids with their text (ids 0..66)",
                       "  ok: added token types: 6 special = CONTROL, 0 non-special = USER_DEFINED",
                       "  ok: bos id: 1 (tokenizer_config.json bos_token '<s>', generation_config.json bos_token_id)",
                       "  ok: eos id: 2 (tokenizer_config.json eos_token '</s>', generation_config.json eos_token_id)",
                       "  ok: token_embd.weight: [80, 32] = model.embed_tokens.weight"]


def test_check_json_and_several_findings(merged, tmp_path, capsys):
    tokens, types = demo_vocabulary(80)
    types[65] = USER_DEFINED
    path = write_gguf(tmp_path / "bad.gguf", tokens, types, eos=65, embedding=(80, 16))
    assert main(["gguf", str(merged), "--check", str(path), "--json"]) == 1
    payload = json.loads(capsys.readouterr().out)
    assert payload["ok"] is False and payload["command"] is None
    assert [f["code"] for f in payload["findings"]] == ["wrong-token-type", "wrong-eos-id", "wrong-embedding-shape"]
    assert len(payload["checks"]) == 6


def test_a_passing_check_exits_0(merged, tmp_path, capsys):
    path = write_gguf(tmp_path / "good.gguf", *demo_vocabulary(80))
    assert main(["gguf", str(merged), "--check", str(path)]) == 0
    assert capsys.readouterr().out.startswith(f"gguf {path} against {merged}: 6 checks, all passed\n  ok: token count: ")


def test_not_a_gguf_file_is_one_line(merged, tmp_path, capsys):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"not a gguf file at all")
    assert main(["gguf", str(merged), "--check", str(path)]) == 2
    assert one_line(capsys.readouterr().err).startswith(f"error: {path}: not a readable GGUF file (")
    assert main(["gguf", str(merged), "--check", str(tmp_path / "none.gguf")]) == 2
    assert one_line(capsys.readouterr().err) == f"error: GGUF file {tmp_path / 'none.gguf'}: does not exist; pass the .gguf file the converter wrote"


def test_without_the_gguf_package_it_says_how_to_install_it(merged, tmp_path, capsys, monkeypatch):
    path = write_gguf(tmp_path / "m.gguf", *demo_vocabulary(80))
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
    assert main(["gguf", str(merged), "--check", str(path)]) == 2
    assert one_line(capsys.readouterr().err) == ("error: merge-adapter gguf: reading a GGUF file needs the gguf package, "
                                                 "which is not installed; pip install 'merger[gguf]'")


# ---------------------------------------------------------------- the converter's wiring, with a stand-in script


def test_without_llama_cpp_it_prints_the_command_and_does_nothing(merged, capsys):
    before = sorted(p.name for p in merged.parent.iterdir())
    assert main(["gguf", str(merged), "--outtype", "q8_0"]) == 0
    captured = capsys.readouterr()
    outfile = merged.parent / "merged-q8_0.gguf"
    assert captured.out.splitlines() == [
        f"python3 llama.cpp/convert_hf_to_gguf.py {merged} --outfile {outfile} --outtype q8_0",
        f"merge-adapter gguf {merged} --check {outfile}"]
    assert "llama.cpp is not bundled" in captured.err
    assert sorted(p.name for p in merged.parent.iterdir()) == before
    assert main(["gguf", str(merged), "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["command"].endswith(f"--outfile {merged.parent / 'merged.gguf'} --outtype auto")


@pytest.mark.parametrize(("argv", "expected"), [
    (["--check", "x.gguf", "--llama-cpp", "l"], "error: merge-adapter gguf: --check reads an existing GGUF and --llama-cpp convert a new one; give one or the other"),
    (["--outtype", "q4_0"], "error: merge-adapter gguf: argument --outtype: invalid choice: 'q4_0'"),
])
def test_gguf_usage_errors(merged, capsys, argv, expected):
    try:
        code = main(["gguf", str(merged), *argv])
    except SystemExit as stop:
        code = stop.code
    assert code == 2
    assert one_line(capsys.readouterr().err).startswith(expected)


FAKE_CONVERTER = """
import argparse, os, shutil, sys
parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("--outfile")
parser.add_argument("--outtype")
args = parser.parse_args()
print("INFO:hf-to-gguf:Loading model:", os.path.basename(args.model), args.outtype)
if os.environ.get("FAKE_CONVERTER_KILLED"):
    os.kill(os.getpid(), 9)
if os.environ.get("FAKE_CONVERTER_FAILS"):
    open(args.outfile, "wb").write(b"half")
    print("Traceback (most recent call last):", file=sys.stderr)
    print("NotImplementedError: BPE pre-tokenizer was not recognized - update get_vocab_base_pre()", file=sys.stderr)
    sys.exit(1)
shutil.copyfile(os.environ["FAKE_CONVERTER_GGUF"], args.outfile)
"""


@pytest.fixture
def fake_llama_cpp(tmp_path):
    folder = tmp_path / "llama.cpp"
    folder.mkdir()
    (folder / "convert_hf_to_gguf.py").write_text(FAKE_CONVERTER)
    return folder


def test_a_conversion_runs_the_checkout_converter_then_checks(merged, fake_llama_cpp, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_CONVERTER_GGUF", str(write_gguf(tmp_path / "made.gguf", *demo_vocabulary(67))))
    outfile = tmp_path / "out" / "m.gguf"
    outfile.parent.mkdir()
    code = main(["gguf", str(merged), "--llama-cpp", str(fake_llama_cpp), "--outfile", str(outfile), "--outtype", "f16", "--json", "-q"])
    payload = json.loads(capsys.readouterr().out)
    assert code == 1 and [f["code"] for f in payload["findings"]] == ["wrong-token-count"]
    assert payload["command"] == [sys.executable, str(fake_llama_cpp / "convert_hf_to_gguf.py"), str(merged),
                                  "--outfile", str(outfile), "--outtype", "f16"]
    assert [p.name for p in outfile.parent.iterdir()] == ["m.gguf"]  # no staging file left
    # an existing GGUF is replaced only when asked
    assert main(["gguf", str(merged), "--llama-cpp", str(fake_llama_cpp), "--outfile", str(outfile), "-q"]) == 2
    assert one_line(capsys.readouterr().err) == f"error: --outfile {outfile}: exists; pass --overwrite to replace it, or name another file"
    monkeypatch.setenv("FAKE_CONVERTER_GGUF", str(write_gguf(tmp_path / "good.gguf", *demo_vocabulary(80))))
    assert main(["gguf", str(merged), "--llama-cpp", str(fake_llama_cpp), "--outfile", str(outfile), "--overwrite", "-q"]) == 0
    assert "6 checks, all passed" in capsys.readouterr().out


def test_a_failed_conversion_is_one_line_and_leaves_nothing(merged, fake_llama_cpp, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_CONVERTER_FAILS", "1")
    outfile = tmp_path / "out" / "m.gguf"
    outfile.parent.mkdir()
    assert main(["gguf", str(merged), "--llama-cpp", str(fake_llama_cpp), "--outfile", str(outfile), "-q"]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"error: llama.cpp's convert_hf_to_gguf.py failed on {merged} (exit 1): NotImplementedError: BPE pre-tokenizer "
        "was not recognized - update get_vocab_base_pre(); llama.cpp does not know this tokenizer (its converter "
        f"recognises the pre-tokenizers of the model families listed in {fake_llama_cpp}/convert_hf_to_gguf_update.py): "
        "update the checkout, or convert a model family llama.cpp supports")
    assert list(outfile.parent.iterdir()) == []


def test_a_killed_converter_says_so(merged, fake_llama_cpp, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_CONVERTER_KILLED", "1")
    assert main(["gguf", str(merged), "--llama-cpp", str(fake_llama_cpp), "--outfile", str(tmp_path / "m.gguf"), "-q"]) == 2
    assert one_line(capsys.readouterr().err).startswith(
        f"error: llama.cpp's convert_hf_to_gguf.py failed on {merged} (killed by signal 9, as the out-of-memory killer does): "
        "INFO:hf-to-gguf:Loading model: merged auto; ")
    assert list(tmp_path.glob("*.gguf")) == [] and list(tmp_path.glob(".merger-gguf-*")) == []


def test_a_missing_converter_is_one_line(merged, tmp_path, capsys):
    assert main(["gguf", str(merged), "--llama-cpp", str(tmp_path), "-q"]) == 2
    assert one_line(capsys.readouterr().err) == (f"error: --llama-cpp {tmp_path}: has no convert_hf_to_gguf.py; pass the root "
                                                 "of a llama.cpp checkout (git clone https://github.com/ggml-org/llama.cpp)")


# ---------------------------------------------------------------- (c) llama.cpp's own converter (MERGER_LLAMA_CPP)

LLAMA_CPP = os.environ.get("MERGER_LLAMA_CPP")
needs_llama_cpp = pytest.mark.skipif(
    not (LLAMA_CPP and (Path(LLAMA_CPP) / "convert_hf_to_gguf.py").is_file()),
    reason="set MERGER_LLAMA_CPP to a llama.cpp source folder (with convert_hf_to_gguf.py and its requirements "
           "installed in this Python) to run llama.cpp's own converter")


def build_llama_bpe_pair(folder: Path, pad_to_multiple_of: int | None) -> tuple[Path, Path]:
    """A tiny Llama with a tokenizer llama.cpp's converter reads (Llama-2 style: BPE with byte fallback,
    bytes in the vocabulary, tokenizer.json only), and an adapter that adds two special tokens and a
    plain one and resizes the embedding, as a chat fine-tune does."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{i:02X}>" for i in range(256)])}
    for piece in ["\u2581", "a", "b", "c", "\u2581a", "\u2581b", "ab", "\u2581ab"]:
        vocab[piece] = len(vocab)
    core = Tokenizer(models.BPE(vocab, [("\u2581", "a"), ("\u2581", "b"), ("a", "b"), ("\u2581a", "b")],
                                unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    core.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    core.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    core.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    base, adapter = folder / "base", folder / "adapter"
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                                         tie_word_embeddings=False))
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.add_tokens(["<tool>"])
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=pad_to_multiple_of, mean_resizing=False)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"]))
    perturb_trainable(peft_model, seed=0)
    peft_model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    return base, adapter


@needs_llama_cpp
@pytest.mark.slow
def test_llama_cpp_converts_an_unpadded_merge_that_passes(tmp_path, capsys):
    from merger import merge_adapter

    base, adapter = build_llama_bpe_pair(tmp_path, pad_to_multiple_of=None)
    merge_adapter(base, adapter, tmp_path / "merged", quiet=True)
    code = main(["gguf", str(tmp_path / "merged"), "--llama-cpp", LLAMA_CPP, "--outtype", "f16", "-q"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "6 checks, all passed" in out and (tmp_path / "merged-f16.gguf").is_file()


@needs_llama_cpp
@pytest.mark.slow
def test_llama_cpp_on_a_padded_merge_the_token_count_tells_the_truth(tmp_path, capsys):
    """The embedding has 320 rows (a multiple of 64) for 270 tokens. A converter that pads the token
    list passes; one that writes len(tokenizer) tokens (llama.cpp's tokenizer.json-only Llama path,
    as of 2025) must fail on exactly the token count."""
    from merger import merge_adapter
    from merger.gguf import read_gguf_facts

    base, adapter = build_llama_bpe_pair(tmp_path, pad_to_multiple_of=64)
    merge_adapter(base, adapter, tmp_path / "merged", quiet=True)
    code = main(["gguf", str(tmp_path / "merged"), "--llama-cpp", LLAMA_CPP, "--json", "-q"])
    payload = json.loads(capsys.readouterr().out)
    facts = read_gguf_facts(tmp_path / "merged.gguf")
    assert facts.embedding_shape == (320, 32)
    if len(facts.tokens) == 320:
        assert code == 0 and payload["ok"], payload
    else:
        assert code == 1 and [f["code"] for f in payload["findings"]] == ["wrong-token-count"], payload


@needs_llama_cpp
@pytest.mark.slow
def test_llama_cpp_refusing_a_tokenizer_is_one_line(demo_pair, tmp_path, capsys):
    """The demo's WordLevel tokenizer is not one llama.cpp converts."""
    from merger import merge_adapter

    merge_adapter(demo_pair[0], demo_pair[1], tmp_path / "merged", quiet=True)
    assert main(["gguf", str(tmp_path / "merged"), "--llama-cpp", LLAMA_CPP, "-q"]) == 2
    assert one_line(capsys.readouterr().err).startswith(f"error: llama.cpp's convert_hf_to_gguf.py failed on {tmp_path / 'merged'} (exit 1): ")
    assert not (tmp_path / "merged.gguf").exists()
