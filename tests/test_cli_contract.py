"""The CLI's contract on every path: one line on stderr, exit 2 for usage and input errors (argparse's
too), JSON on stdout with --json even when it fails, and a SIGTERM that leaves nothing behind."""

import json
import signal
import subprocess
import sys
import time

import pytest

from merger.cli import main
from merger.demo import build_demo_pair
from merger.options import MergeOptions, load_config_file


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build_demo_pair(tmp_path_factory.mktemp("cli"))


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(("argv", "expected"), [
    (["--adapter", "a", "--out", "o", "--dtype", "fp8"], "error: merge-adapter: argument --dtype: invalid choice: 'fp8'"),
    ([], "error: merge-adapter: the following arguments are required: --adapter, --out; see merge-adapter --help"),
    (["merg", "--adapter", "a", "--out", "o"], "('merg' is not a command: merge, inspect, validate, demo, gguf; without one, merge-adapter merges)"),
    (["inspect", "--adapter", "a", "--overwrite"], "error: merge-adapter inspect: unrecognized arguments: --overwrite"),
])
def test_usage_errors_are_one_line_and_exit_2(capsys, argv, expected):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert expected in one_line(capsys.readouterr().err)


def test_json_on_bad_input_is_still_json(tmp_path, capsys):
    code = main(["--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--json"])
    captured = capsys.readouterr()
    assert code == 2
    assert json.loads(captured.out) == {"ok": False, "exit_code": 2, "error": one_line(captured.err).removeprefix("error: ")}


def test_inspect_names_the_blocking_problem_on_stderr(pair, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for item in pair[1].iterdir():
        (adapter / item.name).write_bytes(item.read_bytes())
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "zz_proj"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    weights = load_file(adapter / "adapter_model.safetensors")
    weights["base_model.model.model.layers.0.self_attn.zz_proj.lora_A.weight"] = weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].clone()
    save_file(weights, adapter / "adapter_model.safetensors")
    code = main(["inspect", "--base", str(pair[0]), "--adapter", str(adapter)])
    captured = capsys.readouterr()
    assert code == 2 and "problem:" in captured.out
    assert "modules the adapter targets do not exist in the base LlamaForCausalLM" in one_line(captured.err)


def test_validate_refuses_to_check_nothing(pair, tmp_path, capsys):
    code = main(["validate", str(pair[0]), "--base", str(pair[0]), "--adapter", str(pair[1]), "--validate", "off"])
    assert code == 2
    assert one_line(capsys.readouterr().err) == "error: merge-adapter validate: --validate off would check nothing; use fast (the default) or full"


@pytest.mark.parametrize(("text", "error"), [
    ("overwrite: \"false\"\n", "option overwrite: 'false' is not true or false"),
    ("pad_to_multiple_of: \"64\"\n", "option pad_to_multiple_of: '64' is not a positive integer"),
    ("max_shard_size: 0\n", "option max_shard_size: 0 is not a positive size like 5GB or 500MB"),
])
def test_config_values_of_the_wrong_type_are_refused(tmp_path, text, error):
    from merger import OptionsError

    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(OptionsError) as caught:
        MergeOptions.from_mapping(load_config_file(path))
    assert str(caught.value) == error


def test_yaml_bare_off_means_off(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("validate: off\n")  # YAML 1.1 reads it as false
    assert MergeOptions.from_mapping(load_config_file(path)).validate == "off"


def test_out_is_never_the_folder_you_are_in(pair, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    code = main(["--base", str(pair[0]), "--adapter", str(pair[1]), "--out", ".", "--overwrite"])
    assert code == 2 and "is the current folder or one of its parents" in one_line(capsys.readouterr().err)
    assert (work / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_sigterm_mid_merge_leaves_nothing_behind(tmp_path):
    """docker stop / timeout / Slurm preemption send SIGTERM: the staging folder goes, OUT stays as it was."""
    # a bigger base so the merge is still writing when the signal lands
    from transformers import LlamaConfig, LlamaForCausalLM

    base = tmp_path / "base"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(base)
    adapter = tmp_path / "adapter"
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(LlamaForCausalLM.from_pretrained(base), LoraConfig(r=8, target_modules=["q_proj", "down_proj"]))
    model.save_pretrained(adapter)
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("an earlier merge")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_MERGE, str(base), str(adapter), str(out)],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.tmp-*/*.safetensors")):  # wait until shards are being written
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert one_line(err).startswith("error: interrupted; OUT is as it was")
    assert not list(tmp_path.glob(".out.*"))
    assert [p.name for p in out.iterdir()] == ["previous.txt"]


# the CLI in a child process, with every shard write slowed so the signal lands mid-merge
SLOW_MERGE = """
import sys, time
from merger import shards
from merger.cli import main
write = shards.ShardWriter.write
def slow(self, *args, **kwargs):
    time.sleep(0.2)
    return write(self, *args, **kwargs)
shards.ShardWriter.write = slow
base, adapter, out = sys.argv[1:]
sys.exit(main(["--base", base, "--adapter", adapter, "--out", out, "--overwrite", "-q", "--max-shard-size", "200KB"]))
"""
