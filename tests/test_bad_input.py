"""Bad input: one line on stderr (what, where, found vs expected, what to do), exit 2, nothing written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from merger.cli import main


def run_cli(capsys, *args):
    code = main(list(map(str, args)))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def nothing_written(out: Path):
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_missing_adapter_config(copies, tmp_path, capsys):
    base, adapter = copies
    (adapter / "adapter_config.json").unlink()
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--base", base, "--adapter", adapter, "--out", out)
    assert_one_line_error(code, err, str(adapter), "not a PEFT adapter", "no adapter_config.json")
    nothing_written(out)


def test_malformed_adapter_config(copies, tmp_path, capsys):
    base, adapter = copies
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8,,}')
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--base", base, "--adapter", adapter, "--out", out)
    assert_one_line_error(code, err, "adapter_config.json", "malformed adapter config JSON at line 1 column")
    nothing_written(out)


def test_base_folder_given_as_adapter(copies, tmp_path, capsys):
    base, _ = copies
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--base", base, "--adapter", base, "--out", out)
    assert_one_line_error(code, err, "not a PEFT adapter", "full model rather than an adapter")
    nothing_written(out)


def test_mlx_adapter_is_recognised(copies, tmp_path, capsys):
    base, adapter = copies
    (adapter / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "lora_parameters": {"rank": 8}}))
    code, _, err = run_cli(capsys, "--base", base, "--adapter", adapter, "--out", tmp_path / "out")
    assert_one_line_error(code, err, "no 'peft_type' key", "MLX-LM adapter")


def test_missing_base_config(copies, tmp_path, capsys):
    base, adapter = copies
    (base / "config.json").unlink()
    code, _, err = run_cli(capsys, "--base", base, "--adapter", adapter, "--out", tmp_path / "out")
    assert_one_line_error(code, err, str(base), "no config.json")


def test_malformed_base_config(copies, tmp_path, capsys):
    base, adapter = copies
    (base / "config.json").write_text("{ not json")
    code, _, err = run_cli(capsys, "--base", base, "--adapter", adapter, "--out", tmp_path / "out")
    assert_one_line_error(code, err, "config.json", "malformed config JSON")


def test_truncated_adapter_weights(copies, tmp_path, capsys):
    base, adapter = copies
    weights = adapter / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--base", base, "--adapter", adapter, "--out", out)
    assert_one_line_error(code, err, "adapter_model.safetensors", "truncated", f"has {len(data) - 100} bytes, its header needs {len(data)}")
    nothing_written(out)


def test_corrupt_base_weights(copies, tmp_path, capsys):
    base, adapter = copies
    (base / "model.safetensors").write_bytes(b"\xff" * 64)
    code, _, err = run_cli(capsys, "--base", base, "--adapter", adapter, "--out", tmp_path / "out")
    assert_one_line_error(code, err, "model.safetensors", "corrupt safetensors header")


def test_missing_base_shard(tmp_path, capsys):
    from merger.demo import build_demo_pair as build

    # a sharded base: re-save the demo base with tiny shards, then delete one
    base, adapter = build(tmp_path / "pair")
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(base).save_pretrained(sharded, max_shard_size="20KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    code, _, err = run_cli(capsys, "--base", sharded, "--adapter", adapter, "--out", tmp_path / "out")
    assert_one_line_error(code, err, "shards but 1 are missing", shards[1].name, "download the complete checkpoint")


def test_adapter_from_another_architecture(copies, tmp_path, capsys):
    base, adapter = copies
    config = json.loads((base / "config.json").read_text())
    config.update(hidden_size=48, intermediate_size=96)  # a base of another size
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other-base"
    LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures", "transformers_version")})).save_pretrained(other)
    code, _, err = run_cli(capsys, "--base", other, "--adapter", adapter, "--out", tmp_path / "out")
    assert_one_line_error(code, err, "trained on another architecture", "lora_A [8, 32] / B [16, 8] do not fit the base weight [16, 48] (A needs 48 columns, B 16 rows)", "more problems; merge-adapter inspect lists them")


def test_target_modules_absent_from_base(copies, tmp_path, capsys):
    base, adapter = copies
    from safetensors.torch import load_file, save_file

    tensors = load_file(adapter / "adapter_model.safetensors")
    renamed = {k.replace("q_proj", "query_key_value"): v for k, v in tensors.items()}
    save_file(renamed, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    code, _, err = run_cli(capsys, "--base", base, "--adapter", adapter, "--out", tmp_path / "out")
    assert_one_line_error(code, err, "2 modules the adapter targets do not exist in the base LlamaForCausalLM", "model.layers.0.self_attn.query_key_value")


def test_non_empty_out_is_untouched(copies, tmp_path, capsys):
    base, adapter = copies
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, _, err = run_cli(capsys, "--base", base, "--adapter", adapter, "--out", out)
    assert_one_line_error(code, err, str(out), "exists and is not empty", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "keep me"


def test_out_inside_an_input_is_refused(copies, capsys):
    base, adapter = copies
    code, _, err = run_cli(capsys, "--base", base, "--adapter", adapter, "--out", adapter / "merged")
    assert_one_line_error(code, err, "overlaps the --adapter input")


def test_prompt_learning_is_refused(copies, tmp_path, capsys):
    base, adapter = copies
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 20}))
    code, _, err = run_cli(capsys, "--base", base, "--adapter", adapter, "--out", tmp_path / "out")
    assert_one_line_error(code, err, "PREFIX_TUNING", "no weights to merge")


def test_unknown_config_file_key(copies, tmp_path, capsys):
    base, adapter = copies
    config = tmp_path / "preset.yaml"
    config.write_text("dtype: bfloat16\nshard_size: 1GB\n")
    code, _, err = run_cli(capsys, "--config", config, "--base", base, "--adapter", adapter, "--out", tmp_path / "out")
    assert_one_line_error(code, err, "unknown option 'shard_size'", str(config))


def test_real_process_exit_code_and_no_traceback(copies, tmp_path):
    base, _ = copies
    proc = subprocess.run([sys.executable, "-m", "merger", "--base", str(base), "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "does not exist" in proc.stderr or "no such folder" in proc.stderr


def test_debug_shows_the_traceback(copies, tmp_path):
    base, _ = copies
    from merger import InputNotFoundError

    with pytest.raises(InputNotFoundError):  # --debug lets the exception (and its traceback) through
        main(["--base", str(base), "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "out"), "--debug"])


def test_hub_id_offline_and_not_cached(copies, tmp_path, monkeypatch, capsys):
    base, _ = copies
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    code, _, err = run_cli(capsys, "--base", base, "--adapter", "someone/no-such-adapter", "--out", tmp_path / "out")
    assert_one_line_error(code, err, "--adapter someone/no-such-adapter", "not in the Hub cache (HF_HUB_OFFLINE=1)")


def test_quantized_base_is_refused_with_the_full_precision_name(copies, tmp_path, capsys):
    base, adapter = copies
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = "unsloth/llama-3-8b-bnb-4bit"
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_config))
    code, _, err = run_cli(capsys, "--base", base, "--adapter", adapter, "--out", tmp_path / "out")
    assert_one_line_error(code, err, "the base is quantized (bitsandbytes 4-bit)", "full-precision model (e.g. unsloth/llama-3-8b)")


def test_base_defaults_to_the_adapters_recorded_base(copies, tmp_path, capsys):
    base, adapter = copies
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    code, out, err = run_cli(capsys, "--adapter", adapter, "--out", tmp_path / "out", "-q")
    assert code == 0, err
    assert (tmp_path / "out" / "model.safetensors").is_file()
    config["base_model_name_or_path"] = None
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "--adapter", adapter, "--out", tmp_path / "out2")
    assert_one_line_error(code, err, "--base was not given", "names no base_model_name_or_path; pass --base")


@pytest.mark.parametrize(("which", "fragments"), [
    ("adapter", ["adapter_config.json: not UTF-8 text (byte 0 is 0xff)", "so not an adapter config JSON file; re-download or re-save it"]),
    ("base", ["config.json: not UTF-8 text (byte 0 is 0xff), so not a config JSON file", "re-download or re-save it"]),
])
def test_config_that_is_not_text(copies, tmp_path, capsys, which, fragments):
    base, adapter = copies
    target = adapter / "adapter_config.json" if which == "adapter" else base / "config.json"
    target.write_bytes(b"\xff\xfe\x00garbage")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--base", base, "--adapter", adapter, "--out", out)
    assert_one_line_error(code, err, str(target), *fragments)
    nothing_written(out)


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("r", "8", "r is '8' but PEFT writes a positive integer (at most 1e+06) there"),
    ("r", 0, "r is 0 but PEFT writes a positive integer (at most 1e+06) there"),
    ("r", 10**30, "r is 1000000000000000000000000000000 but PEFT writes a positive integer (at most 1e+06) there"),
    ("lora_alpha", "sixteen", "lora_alpha is 'sixteen' but PEFT writes a finite number (at most 1e+06 in size) there"),
    ("lora_alpha", 1e300, "lora_alpha is 1e+300 but PEFT writes a finite number (at most 1e+06 in size) there"),
    ("lora_alpha", 10**400, "lora_alpha is 100000000000000000...0000000000000000000 but PEFT writes a finite number"),
    ("rank_pattern", {"q_proj": "4"}, "rank_pattern is {'q_proj': '4'} but PEFT writes a mapping of module regex to positive integer there"),
    ("rank_pattern", {"q_proj(": 4}, "rank_pattern is {'q_proj(': 4} but PEFT writes a mapping of module regex to positive integer there"),
    ("target_modules", 7, "target_modules is 7 but PEFT writes a list of module names or a valid regex string there"),
    ("target_modules", "q_proj(", "target_modules is 'q_proj(' but PEFT writes a list of module names or a valid regex string there"),
    ("trainable_token_indices", "abc", "trainable_token_indices is 'abc' but PEFT writes a list of token ids, or a mapping of module name to token ids there"),
])
def test_config_values_of_the_wrong_type(copies, tmp_path, capsys, key, value, expected):
    base, adapter = copies
    config = json.loads((adapter / "adapter_config.json").read_text())
    config[key] = value
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--base", base, "--adapter", adapter, "--out", out)
    assert_one_line_error(code, err, f"adapter_config.json: {expected}")
    assert err.strip().endswith("; fix the value or re-save the adapter")
    nothing_written(out)


def test_rank_that_disagrees_with_the_weights(copies, tmp_path, capsys):
    base, adapter = copies
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["r"] = 4  # the demo adapter was trained with r=8
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--base", base, "--adapter", adapter, "--out", out)
    assert_one_line_error(code, err, "lora_A.weight: rank 8 but adapter_config.json gives this module r=4",
                          "the config and the weights disagree; re-save the adapter", "more problems; merge-adapter inspect lists them")
    nothing_written(out)


def test_base_weights_of_another_size_than_their_config(copies, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    base, adapter = copies
    weights = load_file(base / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"] = torch.zeros(48, 32)  # config: intermediate 64
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--base", base, "--adapter", adapter, "--out", out)
    assert_one_line_error(code, err, f"{base}: 1 base tensor does not have the shape its config.json describes "
                          "(model.layers.0.mlp.up_proj.weight [48, 32] (config: [64, 32])); the weights belong to another model size")
    nothing_written(out)


@pytest.mark.parametrize("which", ["base", "adapter"])
def test_a_file_given_for_a_folder(copies, tmp_path, capsys, which):
    base, adapter = copies
    a_file = tmp_path / "model.safetensors"
    a_file.write_bytes(b"x")
    args = {"base": base, "adapter": adapter, which: a_file}
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--base", args["base"], "--adapter", args["adapter"], "--out", out)
    assert_one_line_error(code, err, f"--{which} {a_file}: is a file, not a folder; pass the")
    nothing_written(out)


def test_out_under_a_file(copies, tmp_path, capsys):
    base, adapter = copies
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "merged"
    code, _, err = run_cli(capsys, "--base", base, "--adapter", adapter, "--out", out)
    assert_one_line_error(code, err, f"--out {out}: cannot create its parent folder {tmp_path / 'afile'}", "choose another location")
    assert (tmp_path / "afile").read_text() == "x"


def test_out_in_a_folder_that_refuses_writes(copies, tmp_path, capsys, monkeypatch):
    # a read-only disk or a folder without write permission (root ignores chmod, so the refusal
    # is simulated where the staging folder is created)
    import pathlib

    base, adapter = copies
    locked = tmp_path / "locked"
    locked.mkdir()
    real_mkdir = pathlib.Path.mkdir

    def refusing_mkdir(self, *args, **kwargs):
        if self.parent == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", refusing_mkdir)
    code, _, err = run_cli(capsys, "--base", base, "--adapter", adapter, "--out", locked / "merged")
    assert_one_line_error(code, err, f"--out {locked / 'merged'}: cannot write in {locked} (Permission denied)",
                          "choose a folder you can write to")
    assert list(locked.iterdir()) == []


def test_a_recorded_base_that_is_not_here_is_named_as_recorded(copies, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, adapter = copies
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "unsloth/llama-3-8b-bnb-4bit"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "--adapter", adapter, "--out", tmp_path / "out")
    assert_one_line_error(code, err, f"the base the adapter names ({adapter / 'adapter_config.json'}: base_model_name_or_path "
                          "unsloth/llama-3-8b-bnb-4bit): not a local folder and not in the Hub cache (HF_HUB_OFFLINE=1)",
                          "or pass --base; it names a quantized model: merge into the full-precision model it was made from (e.g. unsloth/llama-3-8b)")
    assert "--base unsloth" not in err
