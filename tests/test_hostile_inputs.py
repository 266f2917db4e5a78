"""Hostile and unlucky inputs: each is refused with one line and exit 2, or merged exactly right.

Crafted safetensors headers, indexes that point outside the model folder, links out of input
folders, tokenizers that want to run code, non-finite values, option files built to explode,
and OUT shared between runs or with an input.
"""

import ast
import json
import math
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from merger.cli import main
from merger.errors import CheckpointError
from merger.lock import output_lock
from merger.tensors import read_safetensors_header
from merger.validate import exceeds, worse

from .test_bad_input import assert_one_line_error, nothing_written, run_cli

MERGER_SOURCE = Path(__file__).resolve().parents[1] / "merger"


def read_file(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def write_file(path: Path, header, data: bytes) -> None:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def first_two(header: dict) -> tuple[str, str]:
    """The first two tensors in data order."""
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return names[0], names[1]


def merge(capsys, base, adapter, out, *extra):
    return run_cli(capsys, "--base", base, "--adapter", adapter, "--out", out, *extra)


# --------------------------------------------------------------------------- safetensors headers

def negative_offset(h, d):
    a, _ = first_two(h)
    h[a]["data_offsets"] = [-8, h[a]["data_offsets"][1] - 8]
    return h, d


def reversed_offsets(h, d):
    a, _ = first_two(h)
    h[a]["data_offsets"] = h[a]["data_offsets"][::-1]
    return h, d


def overlapping(h, d):
    _, b = first_two(h)
    begin, end = h[b]["data_offsets"]
    h[b]["data_offsets"] = [begin - 4, end - 4]
    return h, d


def dtype_bigger_than_bytes(h, d):  # F64 over F32-sized bytes: the 1e37 case
    a, _ = first_two(h)
    h[a]["dtype"] = "F64"
    return h, d


def shape_bigger_than_bytes(h, d):
    a, _ = first_two(h)
    h[a]["shape"] = [h[a]["shape"][0] * 1000] + h[a]["shape"][1:]
    return h, d


def trailing_bytes(h, d):
    return h, d + b"\0" * 64


def truncated(h, d):
    return h, d[:-100]


def unknown_dtype(h, d):
    a, _ = first_two(h)
    h[a]["dtype"] = "Q4_K"
    return h, d


def float_shape(h, d):
    a, _ = first_two(h)
    h[a]["shape"] = [float(x) for x in h[a]["shape"]]
    return h, d


def entry_not_an_object(h, d):
    h["model.extra"] = [1, 2, 3]
    return h, d


def duplicated_key(h, d):
    a, b = first_two(h)
    text = json.dumps(h)
    # the second tensor's entry under the first one's name: valid JSON, two values for one key
    return text.replace(json.dumps(b), json.dumps(a), 1).encode(), d


def huge_header_length(h, d):
    return b"{}" + b" " * 8, d  # rewritten below with a lying length


HEADER_FAULTS = {
    "negative offset": (negative_offset, "data_offsets"),
    "reversed offsets": (reversed_offsets, "data_offsets"),
    "overlapping tensors": (overlapping, "overlaps the tensor before it"),
    "dtype x shape larger than its bytes": (dtype_bigger_than_bytes, "needs"),
    "shape larger than its bytes": (shape_bigger_than_bytes, "needs"),
    "trailing bytes": (trailing_bytes, "longer than its header says"),
    "truncated": (truncated, "truncated"),
    "unknown dtype": (unknown_dtype, "which safetensors does not define"),
    "float shape": (float_shape, "not a list of non-negative integers"),
    "entry not an object": (entry_not_an_object, "lacks dtype, shape or data_offsets"),
    "duplicated key": (duplicated_key, "is listed twice"),
}


@pytest.mark.parametrize("fault", sorted(HEADER_FAULTS))
@pytest.mark.parametrize("where", ["base", "adapter"])
def test_corrupt_safetensors_header_is_refused(copies, tmp_path, capsys, fault, where):
    base, adapter = copies
    path = base / "model.safetensors" if where == "base" else adapter / "adapter_model.safetensors"
    mutate, fragment = HEADER_FAULTS[fault]
    write_file(path, *mutate(*read_file(path)))
    out = tmp_path / "out"
    code, _, err = merge(capsys, base, adapter, out)
    assert_one_line_error(code, err, str(path), fragment)
    nothing_written(out)


def test_header_length_beyond_the_file_is_refused(copies, tmp_path, capsys):
    base, adapter = copies
    path = base / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 10**15) + raw[8:])
    code, _, err = merge(capsys, base, adapter, tmp_path / "out")
    assert_one_line_error(code, err, "corrupt safetensors header (claims 1000000000000000 header bytes")


def test_a_key_in_two_shards_is_refused(copies, tmp_path, capsys):
    base, adapter = copies
    header, data = read_file(base / "model.safetensors")
    norm = header["model.norm.weight"]
    begin, end = norm["data_offsets"]
    write_file(base / "model-extra.safetensors", {"model.norm.weight": {**norm, "data_offsets": [0, end - begin]}}, data[begin:end])
    keys = [k for k in header if k != "__metadata__"]
    index = {"weight_map": {**{k: "model.safetensors" for k in keys}}}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    index["weight_map"]["model.extra"] = "model-extra.safetensors"
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    code, _, err = merge(capsys, base, adapter, tmp_path / "out")
    assert_one_line_error(code, err, "tensor 'model.norm.weight' is in both", "re-download it")


# ------------------------------------------------- fuzzing: refuse, or read exactly what safe_open reads


DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64, "U8": torch.uint8}


@st.composite
def safetensors_files(draw):
    """A valid file's header and data, then one random corruption of it (or none)."""
    count = draw(st.integers(1, 4))
    header, data = {}, b""
    for i in range(count):
        tag = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=3))
        tensor = (torch.arange(math.prod(shape)) % 7).to(DTYPES[tag]).reshape(shape)
        raw = tensor.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        header[f"t{i}"] = {"dtype": tag, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    order = draw(st.permutations(sorted(header)))
    header = {k: header[k] for k in order}  # the JSON order need not be the data order
    name = draw(st.sampled_from(sorted(header)))
    entry = header[name]
    kind = draw(st.sampled_from(["none", "offset", "dtype", "shape", "data", "rename"]))
    if kind == "offset":
        which = draw(st.integers(0, 1))
        entry["data_offsets"][which] = draw(st.integers(-3, len(data) + 3))
    elif kind == "dtype":
        entry["dtype"] = draw(st.sampled_from(sorted(DTYPES) + ["F64", "BOOL", "F8_E4M3", "XX"]))
    elif kind == "shape":
        entry["shape"] = draw(st.lists(st.integers(-1, 6), min_size=0, max_size=3))
    elif kind == "data":
        data = data + b"\0" * draw(st.integers(-len(data), 8)) if draw(st.booleans()) else data[: draw(st.integers(0, len(data)))]
    elif kind == "rename" and len(header) > 1:
        other = draw(st.sampled_from(sorted(k for k in header if k != name)))
        header[other] = header.pop(name)  # two names swap meaning: still a valid file, if consistent
    return header, data


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(safetensors_files())
def test_fuzzed_headers_are_refused_or_read_exactly_as_the_library_reads_them(tmp_path, case):
    from safetensors import safe_open

    header, data = case
    path = tmp_path / "fuzz.safetensors"
    write_file(path, header, data)
    try:
        metas = read_safetensors_header(path)
    except CheckpointError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
        return
    raw = path.read_bytes()
    with safe_open(str(path), framework="pt") as handle:
        assert set(handle.keys()) == set(metas)
        for key, meta in metas.items():
            expected = handle.get_tensor(key).reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if meta.nbytes else b""
            assert raw[meta.offset:meta.offset + meta.nbytes] == expected


OUTSIDE = "OUTSIDE"  # stands for the absolute path of a real safetensors file outside the model folder


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(min_size=0, max_size=30) | st.sampled_from(
    ["../outside.safetensors", OUTSIDE, "link.safetensors", "sub/../../outside.safetensors", "/etc/passwd", "..", ".",
     "sub\\..\\x", "inside.safetensors"]))
def test_fuzzed_index_entries_never_leave_the_folder(tmp_path_factory, name):
    """Whatever an index names, merger opens nothing outside the folder, though real files wait there."""
    import builtins
    import io

    from safetensors.torch import save_file

    from merger.checkpoint import inspect_checkpoint_folder
    from merger.errors import MergerError

    root = tmp_path_factory.mktemp("fuzzidx")
    folder = root / "model"
    folder.mkdir()
    save_file({"w": torch.zeros(2)}, root / "outside.safetensors")
    save_file({"w": torch.zeros(2)}, folder / "inside.safetensors")
    (folder / "link.safetensors").symlink_to(root / "outside.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    entry = str(root / "outside.safetensors") if name == OUTSIDE else name
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": entry}}))
    opened = []
    real_open, real_io_open = builtins.open, io.open

    def watching(opener):
        def watched(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)):
                opened.append(os.path.realpath(file))
            return opener(file, *args, **kwargs)
        return watched

    builtins.open, io.open = watching(real_open), watching(real_io_open)
    try:
        inspect_checkpoint_folder(folder)
    except MergerError:
        pass
    finally:
        builtins.open, io.open = real_open, real_io_open
    inside = os.path.realpath(folder)
    assert all(p == inside or p.startswith(inside + os.sep) for p in opened), opened


# ------------------------------------------------------------------------------- confinement

@pytest.mark.parametrize("entry", ["../outside/model.safetensors", "ABSOLUTE"])
def test_index_entry_outside_the_folder_is_refused_before_reading_it(copies, tmp_path, capsys, entry):
    base, adapter = copies
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(base / "model.safetensors", outside / "model.safetensors")
    target = str(outside / "model.safetensors") if entry == "ABSOLUTE" else entry
    keys = [k for k in read_file(outside / "model.safetensors")[0] if k != "__metadata__"]
    (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: target for k in keys}}))
    out = tmp_path / "out"
    code, _, err = merge(capsys, base, adapter, out)
    assert_one_line_error(code, err, "model.safetensors.index.json of", "not a plain path inside the folder", "re-download it")
    nothing_written(out)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json", "generation_config.json"])
def test_base_file_linking_out_of_its_folder_is_refused(copies, tmp_path, capsys, name):
    base, adapter = copies
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(base / name, elsewhere / name)
    (base / name).symlink_to(elsewhere / name)
    if name == "tokenizer.json":  # the base's tokenizer is only read when it is the one written
        extra = ("--tokenizer", "base")
    else:
        extra = ()
    out = tmp_path / "out"
    code, _, err = merge(capsys, base, adapter, out, *extra)
    assert_one_line_error(code, err, f"'{name}' is a link to", "outside the folder", "copy the file into the folder")
    nothing_written(out)


def test_adapter_tokenizer_linking_to_a_private_file_is_never_copied(copies, tmp_path, capsys):
    base, adapter = copies
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN PRIVATE KEY-----")
    (adapter / "special_tokens_map.json").symlink_to(secret)
    out = tmp_path / "out"
    code, _, err = merge(capsys, base, adapter, out)
    assert_one_line_error(code, err, "'special_tokens_map.json' is a link to", str(secret))
    nothing_written(out)


def test_chat_template_folder_with_a_link_out_is_refused(copies, tmp_path, capsys):
    base, adapter = copies
    secret = tmp_path / "secret.jinja"
    secret.write_text("private")
    (adapter / "additional_chat_templates").mkdir()
    (adapter / "additional_chat_templates" / "tool.jinja").symlink_to(secret)
    out = tmp_path / "out"
    code, _, err = merge(capsys, base, adapter, out)
    assert_one_line_error(code, err, "'additional_chat_templates/tool.jinja' is a link to")
    nothing_written(out)


def test_links_inside_the_folder_and_into_a_hub_cache_are_followed(demo_pair, tmp_path, capsys):
    """huggingface_hub stores snapshots as links into the repo's blobs/ folder: that is still inside."""
    repo = tmp_path / "models--owner--base"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for item in demo_pair[0].iterdir():
        shutil.copyfile(item, blobs / f"blob-{item.name}")
        (snapshot / item.name).symlink_to(Path("../../blobs") / f"blob-{item.name}")
    adapter = tmp_path / "adapter"
    shutil.copytree(demo_pair[1], adapter)
    (adapter / "tokenizer.json").rename(adapter / "real-tokenizer.json")
    (adapter / "tokenizer.json").symlink_to("real-tokenizer.json")  # a link within the folder
    out = tmp_path / "out"
    code, _, err = merge(capsys, snapshot, adapter, out)
    assert code == 0, err
    assert (out / "tokenizer.json").read_bytes() == (adapter / "real-tokenizer.json").read_bytes()
    assert not (out / "tokenizer.json").is_symlink()


def test_an_unused_link_out_is_named_in_the_report_not_read(copies, tmp_path, capsys):
    base, adapter = copies
    (tmp_path / "notes.txt").write_text("not the adapter's")
    (adapter / "notes.txt").symlink_to(tmp_path / "notes.txt")
    out = tmp_path / "out"
    code, _, err = merge(capsys, base, adapter, out)
    assert code == 0, err
    hashes = json.loads((out / "merge_report.json").read_text())["inputs"]["sha256"]["adapter"]
    assert hashes["notes.txt"] == "not read: a link to outside the folder"


# ------------------------------------------------------------------------ code from inputs

EVIL_TOKENIZER = """
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import PreTrainedTokenizer
class EvilTokenizer(PreTrainedTokenizer):
    pass
"""


def test_tokenizer_code_never_runs_and_stdin_is_never_read(copies, tmp_path):
    """A tokenizer that needs its own code: transformers would ask "run the custom code? [y/N]"."""
    base, adapter = copies
    marker = tmp_path / "code-ran"
    for name in ("tokenizer.json", "chat_template.jinja"):
        (adapter / name).unlink()
    (adapter / "tokenization_evil.py").write_text(EVIL_TOKENIZER.format(marker=str(marker)))
    (adapter / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    (adapter / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for command in (["inspect", "--json"], ["--out", str(tmp_path / "out"), "--validate", "full"]):
        done = subprocess.run([sys.executable, "-m", "merger", *command[:1], "--base", str(base), "--adapter", str(adapter),
                               *command[1:]], input="y\ny\ny\n", capture_output=True, text=True, timeout=300, env=env)
        assert not marker.exists(), "the tokenizer's code ran"
        assert "custom code" not in done.stdout + done.stderr and "[y/N]" not in done.stdout + done.stderr
        if command[0] == "inspect":
            json.loads(done.stdout)  # nothing but the plan on stdout


def test_every_model_or_tokenizer_load_says_whether_to_trust_code():
    """Left unset, transformers asks on stdin: every from_pretrained/from_config call in merger
    passes trust_remote_code explicitly (PeftConfig reads JSON only and has no such argument)."""
    unset = []
    for path in MERGER_SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("from_pretrained", "from_config"):
                owner = ast.unparse(node.func.value)
                if owner in ("PeftConfig", "PeftModel"):
                    continue
                if not any(k.arg == "trust_remote_code" for k in node.keywords):
                    unset.append(f"{path.name}:{node.lineno} {ast.unparse(node.func)}")
    assert unset == [], unset


# ---------------------------------------------------------------------------- non-finite

@pytest.mark.parametrize("alpha", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_lora_alpha_is_refused(copies, tmp_path, capsys, alpha):
    base, adapter = copies
    text = (adapter / "adapter_config.json").read_text()
    config = json.loads(text)
    config["lora_alpha"] = float(alpha.lower().replace("infinity", "inf"))
    (adapter / "adapter_config.json").write_text(json.dumps(config))  # json writes NaN / Infinity
    assert alpha in (adapter / "adapter_config.json").read_text()
    out = tmp_path / "out"
    code, _, err = merge(capsys, base, adapter, out)
    assert_one_line_error(code, err, "lora_alpha is", "but PEFT writes a finite number (at most 1e+06 in size) there")
    nothing_written(out)


@pytest.mark.parametrize("mode", ["off", "fast"])
def test_nan_in_adapter_values_is_refused_before_merging(copies, tmp_path, capsys, mode):
    from safetensors.torch import load_file, save_file

    base, adapter = copies
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, path)
    out = tmp_path / "out"
    code, _, err = merge(capsys, base, adapter, out, "--validate", mode)
    assert_one_line_error(code, err, key, "hold NaN or Inf values", "use an earlier checkpoint")
    nothing_written(out)
    code, _, err = run_cli(capsys, "inspect", "--base", base, "--adapter", adapter)
    assert code == 2 and "hold NaN or Inf values" in err


def test_nan_errors_fail_and_are_the_worst():
    assert exceeds(float("nan"), 1e-4) and exceeds(2e-4, 1e-4) and not exceeds(1e-5, 1e-4)
    assert math.isnan(worse(0.0, float("nan"))) and math.isnan(worse(float("nan"), 0.5))
    assert worse(0.1, 0.2) == 0.2


def test_nan_in_a_merged_module_fails_its_check(demo_pair, tmp_path, capsys):
    """A NaN in a LoRA-merged weight makes the measured error NaN: the module check must fail, not pass."""
    from safetensors.torch import load_file, save_file

    from merger.api import validate_checkpoint

    base, adapter = demo_pair
    out = tmp_path / "out"
    assert merge(capsys, base, adapter, out)[0] == 0
    tensors = load_file(out / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"][3, 3] = float("nan")
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    report = validate_checkpoint(out, base, adapter)
    assert {f.code for f in report.findings} == {"non-finite", "lora-not-merged"}
    assert math.isnan(report.metrics["max_rel_error_modules"])


def test_a_base_read_through_wrong_offsets_cannot_pass_validation(demo_pair, tmp_path, monkeypatch):
    """Validation re-reads the base through the safetensors library: an engine reader that took
    the wrong bytes for a copied tensor is caught, not echoed."""
    from merger import api
    from merger.engines import stream

    real = stream.TensorFiles.read_rows

    def shifted(self, key, start, stop, into):
        real(self, key, start, stop, into)
        if key == "model.norm.weight":
            into.reshape(-1)[0] += 1.0

    monkeypatch.setattr(stream.TensorFiles, "read_rows", shifted)
    with pytest.raises(api.ValidationFailedError, match="model.norm.weight: differs from the base tensor it copies"):
        api.merge_adapter(demo_pair[0], demo_pair[1], tmp_path / "out", engine="stream", quiet=True)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- sizes

def test_a_merge_that_cannot_fit_in_memory_is_refused_before_loading(demo_pair, tmp_path, capsys, monkeypatch):
    import merger.logits

    monkeypatch.setattr(merger.logits, "available_memory", lambda: 1_000_000)
    out = tmp_path / "out"
    code, _, err = merge(capsys, demo_pair[0], demo_pair[1], out, "--engine", "peft")
    assert_one_line_error(code, err, "--engine peft: loading", "needs about", "this machine has 1.00 MB available", "use --engine stream")
    nothing_written(out)


def test_disk_space_is_said_in_units_that_fit(demo_pair, tmp_path, capsys, monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda _: usage(10**9, 10**9 - 5000, 5000))
    out = tmp_path / "out"
    code, _, err = merge(capsys, demo_pair[0], demo_pair[1], out)
    assert_one_line_error(code, err, "the merged checkpoint needs about", "KB but", "has 5.00 KB free")
    nothing_written(out)


# ------------------------------------------------------------------------ bounded parsing

def test_deeply_nested_config_is_one_line(copies, tmp_path, capsys):
    base, adapter = copies
    (base / "config.json").write_text('{"model_type": "llama", "x": ' + "[" * 200_000 + "]" * 200_000 + "}")
    code, _, err = merge(capsys, base, adapter, tmp_path / "out")
    assert_one_line_error(code, err, "config.json: nests deeper than any config file does")


def test_oversized_index_is_refused_without_parsing_it(copies, tmp_path, capsys):
    base, adapter = copies
    with open(base / "model.safetensors.index.json", "w") as handle:
        handle.write('{"weight_map": {"a": "model.safetensors"}, "pad": "')
        handle.write("x" * (65 << 20))
        handle.write('"}')
    code, _, err = merge(capsys, base, adapter, tmp_path / "out")
    assert_one_line_error(code, err, "model.safetensors.index.json:", "more than any shard index file needs")


def test_yaml_bomb_is_refused_at_once(demo_pair, tmp_path, capsys):
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]"
                                                        for p, c in zip("abcdefgh", "bcdefghi")]
    config = tmp_path / "bomb.yaml"
    config.write_text("\n".join(levels) + "\ndtype: *i\n")
    code, _, err = merge(capsys, demo_pair[0], demo_pair[1], tmp_path / "out", "--config", config)
    assert_one_line_error(code, err, "uses YAML anchors or aliases")


def test_a_huge_bad_option_value_is_echoed_short(demo_pair, tmp_path, capsys):
    config = tmp_path / "long.yaml"
    config.write_text("dtype: [" + ", ".join(["bfloat16"] * 20000) + "]\n")
    code, _, err = merge(capsys, demo_pair[0], demo_pair[1], tmp_path / "out", "--config", config)
    assert_one_line_error(code, err, "option dtype:", "is not a string")
    assert len(err) < 400


def test_malformed_tokenizer_ids_are_one_line(copies, tmp_path, capsys):
    base, adapter = copies
    (adapter / "added_tokens.json").write_text(json.dumps({"<x>": "not-an-id"}))
    code, _, err = merge(capsys, base, adapter, tmp_path / "out")
    assert_one_line_error(code, err, "malformed vocabulary or added-token entry", "re-save the tokenizer")


# ------------------------------------------------------------------------ OUT ownership

def test_a_second_run_into_a_locked_out_is_refused_naming_the_holder(demo_pair, tmp_path, capsys):
    out = tmp_path / "out"
    with output_lock(out):
        code, _, err = merge(capsys, demo_pair[0], demo_pair[1], out)
    assert_one_line_error(code, err, "another merge is writing it", f"pid {os.getpid()}")
    nothing_written(out)
    assert not list(tmp_path.glob(".out.lock"))  # released and removed by its holder


def test_stale_staging_of_a_killed_run_is_removed_and_reported(demo_pair, tmp_path, capsys):
    out = tmp_path / "out"
    stale = tmp_path / ".out.tmp-0badc0de"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 5000)
    keep = tmp_path / ".out.tmp-notours"  # not a name merger makes: left alone
    keep.mkdir()
    code, _, err = merge(capsys, demo_pair[0], demo_pair[1], out)
    assert code == 0, err
    assert not stale.exists() and keep.exists()
    recovered = json.loads((out / "merge_report.json").read_text())["recovered"]
    assert recovered == ["removed .out.tmp-0badc0de (5.00 KB), left beside out by a run that was killed"]


def test_a_replaced_out_whose_successor_never_arrived_is_restored(demo_pair, tmp_path, capsys):
    out = tmp_path / "out"
    old = tmp_path / ".out.old-1234abcd"
    old.mkdir()
    (old / "previous.txt").write_text("the user's earlier merge")
    code, _, err = merge(capsys, demo_pair[0], demo_pair[1], out)
    assert_one_line_error(code, err, "exists and is not empty")  # restored first, so not overwritten silently
    assert (out / "previous.txt").read_text() == "the user's earlier merge" and not old.exists()


@pytest.mark.parametrize("role", ["--tokenizer", "--config"])
def test_out_may_not_be_or_contain_the_tokenizer_or_config(demo_pair, tmp_path, capsys, role):
    folder = tmp_path / "mine"
    shutil.copytree(demo_pair[1], folder)
    (folder / "notes.txt").write_text("keep me")
    extra = ("--tokenizer", folder) if role == "--tokenizer" else ("--config", folder / "opts.yaml")
    if role == "--config":
        (folder / "opts.yaml").write_text("dtype: float32\n")
    code, _, err = merge(capsys, demo_pair[0], demo_pair[1], folder, "--overwrite", *extra)
    assert_one_line_error(code, err, f"overlaps the {role} input")
    assert (folder / "notes.txt").read_text() == "keep me"


def test_out_through_a_link_to_an_input_is_refused(copies, tmp_path, capsys):
    base, adapter = copies
    link = tmp_path / "looks-new"
    link.symlink_to(adapter)
    code, _, err = merge(capsys, base, adapter, link, "--overwrite")
    assert_one_line_error(code, err, "overlaps the --adapter input")
    assert (adapter / "adapter_config.json").is_file()


def test_files_appearing_in_out_during_the_merge_are_never_replaced(demo_pair, tmp_path, capsys, monkeypatch):
    from merger import api

    out = tmp_path / "out"
    real = api.validate_output

    def meanwhile(folder, plan, mode):
        out.mkdir()
        (out / "someone-elses.txt").write_text("written while we merged")
        return real(folder, plan, mode)

    monkeypatch.setattr(api, "validate_output", meanwhile)
    code, _, err = merge(capsys, demo_pair[0], demo_pair[1], out)
    assert_one_line_error(code, err, "files appeared in it while merging", "nothing was replaced")
    assert [p.name for p in out.iterdir()] == ["someone-elses.txt"]
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_validate_reads_only_files_inside_the_checked_folder(demo_pair, tmp_path, capsys):
    """`validate` checks other tools' folders: they are inputs too."""
    base, adapter = demo_pair
    out = tmp_path / "out"
    assert merge(capsys, base, adapter, out)[0] == 0
    elsewhere = tmp_path / "elsewhere.safetensors"
    shutil.move(out / "model.safetensors", elsewhere)
    (out / "model.safetensors").symlink_to(elsewhere)
    code, text, _ = run_cli(capsys, "validate", out, "--base", base, "--adapter", adapter)
    assert code == 1 and "unreadable-shard" in text and "outside the folder" in text
    (out / "model.safetensors").unlink()
    shutil.move(elsewhere, out / "model.safetensors")
    (out / "config.json").write_text("{ broken")
    code, text, _ = run_cli(capsys, "validate", out, "--base", base, "--adapter", adapter)
    assert code == 1 and "unreadable-file" in text and "malformed config JSON" in text


# ------------------------------------------------ adapters that would merge silently wrong

def test_one_adapter_given_twice_is_refused_not_applied_twice(demo_pair, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--base", demo_pair[0], "--adapter", demo_pair[1], "--adapter", demo_pair[1], "--out", out)
    assert_one_line_error(code, err, "given twice (stages 1 and 2)", "pass each adapter folder once")
    nothing_written(out)
    from merger import merge_adapter
    from merger.errors import OptionsError

    with pytest.raises(OptionsError, match="given twice"):
        merge_adapter(demo_pair[0], [demo_pair[1], str(demo_pair[1]) + "/"], out)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga"])
def test_an_unconverted_base_mutating_init_is_refused(copies, tmp_path, capsys, init):
    base, adapter = copies
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["init_lora_weights"] = init
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    code, _, err = merge(capsys, base, adapter, out)
    assert_one_line_error(code, err, f"init_lora_weights='{init}'", "saved without PEFT's conversion",
                          "path_initial_model_for_weight_conversion")
    nothing_written(out)


def test_declared_modules_to_save_missing_from_the_weights_are_refused(copies, tmp_path, capsys):
    """What PEFT's PiSSA/OLoRA conversion saves: LoRA A/B only, while the config still lists the trained layers."""
    from safetensors.torch import load_file, save_file

    base, adapter = copies
    path = adapter / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(path).items() if "lora_" in k}, path)
    out = tmp_path / "out"
    code, _, err = merge(capsys, base, adapter, out)
    assert_one_line_error(code, err, "declares trained modules the adapter file does not hold (embed_tokens, lm_head)")
    nothing_written(out)


def test_declared_modules_the_model_lacks_are_not_missing(copies, tmp_path, capsys):
    """A name in modules_to_save that matches no module was inert in training too (PEFT ignores it)."""
    base, adapter = copies
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["modules_to_save"] = config["modules_to_save"] + ["wte"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    code, _, err = merge(capsys, base, adapter, tmp_path / "out")
    assert code == 0, err


def test_one_lock_for_one_folder_whatever_link_reaches_it(demo_pair, tmp_path, capsys):
    real_out = tmp_path / "x" / "out"
    real_out.parent.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real_out)
    with output_lock(real_out):
        code, _, err = merge(capsys, demo_pair[0], demo_pair[1], link)
    assert_one_line_error(code, err, "another merge is writing it")


def test_a_disk_filling_while_copying_an_input_names_the_output_file(demo_pair, tmp_path, capsys, monkeypatch):
    import errno

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "sendfile", full)  # shutil.copyfile's fast path: its error names source and destination
    out = tmp_path / "out"
    code, _, err = merge(capsys, demo_pair[0], demo_pair[1], out)
    assert_one_line_error(code, err, "the disk filled up while writing", str(tmp_path / ".out.tmp-"))
    nothing_written(out)


# ------------------------------------------------------- found by an adversarial review, each fixed

def test_a_shard_in_a_subfolder_is_read_from_there_not_from_a_namesake(copies, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    base, adapter = copies
    (base / "sub").mkdir()
    shutil.move(base / "model.safetensors", base / "sub" / "weights.safetensors")
    real = load_file(base / "sub" / "weights.safetensors")
    (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "sub/weights.safetensors" for k in real}}))
    save_file({k: v * 0 + 7 for k, v in real.items()}, base / "weights.safetensors")  # a decoy the index never names
    out = tmp_path / "out"
    assert merge(capsys, base, adapter, out)[0] == 0
    merged = load_file(out / "model.safetensors")
    assert torch.equal(merged["model.norm.weight"], real["model.norm.weight"])


def test_a_hub_cache_whose_blobs_folder_links_elsewhere_is_not_trusted(demo_pair, tmp_path, capsys):
    repo = tmp_path / "models--owner--base"
    snapshot = repo / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (repo / "blobs").symlink_to(elsewhere)
    for item in demo_pair[0].iterdir():
        shutil.copyfile(item, elsewhere / item.name)
        (snapshot / item.name).symlink_to(Path("../../blobs") / item.name)
    code, _, err = merge(capsys, snapshot, demo_pair[1], tmp_path / "out")
    assert_one_line_error(code, err, "is a link to", "outside the folder")


def test_trusted_code_that_links_out_of_the_base_never_runs(copies, tmp_path, capsys):
    base, adapter = copies
    marker = tmp_path / "ran"
    (tmp_path / "evil.py").write_text(f"import pathlib; pathlib.Path({str(marker)!r}).write_text('ran')\n")
    (base / "modeling_evil.py").symlink_to(tmp_path / "evil.py")
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (base / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "inspect", "--base", base, "--adapter", adapter, "--trust-remote-code")
    assert_one_line_error(code, err, "'modeling_evil.py' is a link to")
    assert not marker.exists()


def test_the_peft_engine_refuses_a_base_file_transformers_would_read_outside(copies, tmp_path, capsys):
    base, adapter = copies
    (tmp_path / "gen.json").write_text((base / "generation_config.json").read_text())
    (base / "generation_config.json").unlink()
    (base / "generation_config.json").symlink_to(tmp_path / "gen.json")
    (adapter / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))  # so merger itself reads the adapter's
    code, _, err = merge(capsys, base, adapter, tmp_path / "out", "--engine", "peft")
    assert_one_line_error(code, err, "'generation_config.json' is a link to")


def test_sparse_tokenizer_ids_are_refused_without_allocating(copies, tmp_path, capsys):
    base, adapter = copies
    (adapter / "added_tokens.json").write_text(json.dumps({"<evil>": 10**12}))
    code, _, err = merge(capsys, base, adapter, tmp_path / "out")
    assert_one_line_error(code, err, "its tokenizer gives a token the id 1000000000000 but has only")


def test_an_absurd_layer_count_is_refused_before_building_the_model(copies, tmp_path, capsys):
    base, adapter = copies
    config = json.loads((base / "config.json").read_text())
    config["num_hidden_layers"] = 10**9
    (base / "config.json").write_text(json.dumps(config))
    code, _, err = merge(capsys, base, adapter, tmp_path / "out")
    assert_one_line_error(code, err, "num_hidden_layers is 1000000000, beyond any real model")


def test_a_tokenizer_above_an_adapter_is_not_its_tokenizer(copies, tmp_path, capsys):
    base, adapter = copies
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (adapter / name).unlink()
    (tmp_path / "tokenizer.json").write_text((base / "tokenizer.json").read_text().replace('"w3"', '"unrelated"'))
    out = tmp_path / "out"
    assert merge(capsys, base, adapter, out)[0] == 0
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()


def test_integer_tensors_in_the_base_are_copied_exactly(copies, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    base, adapter = copies
    tensors = load_file(base / "model.safetensors")
    tensors["model.layers.0.position_ids"] = torch.arange(16, dtype=torch.int64)
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    code, _, err = merge(capsys, base, adapter, out, "--engine", "stream")
    assert code == 0, err
    assert torch.equal(load_file(out / "model.safetensors")["model.layers.0.position_ids"], torch.arange(16))


def test_a_newline_in_a_name_from_an_input_cannot_forge_a_line(copies, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    base, adapter = copies
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors["evil\nerror: forged"] = torch.zeros(1)
    tensors["x" * 100_000] = torch.zeros(1)
    save_file(tensors, adapter / "adapter_model.safetensors")
    code, _, err = merge(capsys, base, adapter, tmp_path / "out")
    assert_one_line_error(code, err, "evil\\nerror: forged")
    assert len(err) < 2100


@pytest.mark.parametrize(("case", "fragment"), [
    ("header dtype a list", "which safetensors does not define"),
    ("lora_A a vector", "but PEFT saves its lora_A with at least 2 dimensions"),
    ("auto_map a string", "auto_map is 'modeling_x.X' but transformers writes a mapping there"),
    ("yaml key not a string", "is not an option name"),
    ("yaml number too long", "holds a value merger cannot read"),
])
def test_more_bad_input_is_one_line_not_an_unexpected_error(copies, tmp_path, capsys, case, fragment):
    from safetensors.torch import load_file, save_file

    base, adapter = copies
    extra = []
    if case == "header dtype a list":
        header, data = read_file(base / "model.safetensors")
        header[first_two(header)[0]]["dtype"] = ["F32"]
        write_file(base / "model.safetensors", header, data)
    elif case == "lora_A a vector":
        tensors = load_file(adapter / "adapter_model.safetensors")
        key = next(k for k in tensors if "lora_A" in k)
        tensors[key] = tensors[key][0]
        save_file(tensors, adapter / "adapter_model.safetensors")
    elif case == "auto_map a string":
        config = json.loads((base / "config.json").read_text())
        config["auto_map"] = "modeling_x.X"
        (base / "config.json").write_text(json.dumps(config))
    else:
        options = tmp_path / "opts.yaml"
        options.write_text("1: x\n" if case == "yaml key not a string" else "pad_to_multiple_of: " + "9" * 5000 + "\n")
        extra = ["--config", options]
    code, _, err = merge(capsys, base, adapter, tmp_path / "out", *extra)
    assert_one_line_error(code, err, fragment)
    assert "unexpected" not in err


def test_validate_on_a_folder_whose_index_is_not_an_object_is_a_finding(merged_demo, capsys):
    base, adapter, out = merged_demo
    (out / "model.safetensors.index.json").write_text("[1, 2]")
    code, text, _ = run_cli(capsys, "validate", out, "--base", base, "--adapter", adapter)
    assert code == 1 and "unreadable-file" in text and "not an index" in text


@pytest.fixture
def merged_demo(demo_pair, tmp_path):
    from merger import merge_adapter

    out = tmp_path / "out"
    merge_adapter(demo_pair[0], demo_pair[1], out, quiet=True)
    return demo_pair[0], demo_pair[1], out


def test_a_weight_relabelled_as_integers_is_refused(copies, tmp_path, capsys):
    """F32 bytes relabelled I32 make a valid file; merging would copy nonsense weights bit for bit."""
    base, adapter = copies
    header, data = read_file(base / "model.safetensors")
    header["model.norm.weight"]["dtype"] = "I32"
    write_file(base / "model.safetensors", header, data)
    code, _, err = merge(capsys, base, adapter, tmp_path / "out")
    assert_one_line_error(code, err, "model.norm.weight (I32) stored as integers")
