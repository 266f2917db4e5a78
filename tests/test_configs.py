"""Presets in configs/: each loads into MergeOptions with every value explained; unknown keys are
named; flags given on the command line win over the file, all the way into the plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from merger.cli import build_parser, main, resolve_options
from merger.errors import OptionsError
from merger.options import MergeOptions, load_config_file, option_fields

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


def preset(name: str) -> MergeOptions:
    path = CONFIG_DIR / f"{name}.yaml"
    return MergeOptions.from_mapping(load_config_file(path), f"config file {path}")


def test_the_presets_users_asked_for_exist():
    assert {p.stem for p in CONFIGS} == {"autotrain", "medicalgpt", "llama-factory", "xtuner-llava", "axolotl"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_preset_loads_and_explains_every_value(path):
    values = load_config_file(path)
    assert values and set(values) <= {f.name for f in option_fields()}
    options = MergeOptions.from_mapping(values, f"config file {path}")
    for key, value in values.items():
        assert getattr(options, key) == value
    lines = path.read_text().splitlines()
    assert f"--config configs/{path.name}" in path.read_text()  # a usage line to copy
    for i, line in enumerate(lines):
        if line and not line.startswith("#"):  # a key: the line above it is its reason
            assert lines[i - 1].startswith("# "), f"{path.name}: {line!r} has no comment saying why"


def test_preset_values_match_each_tools_outputs():
    # LLaMA-Factory and the llava-hf conversion pad to 64; Autotrain, MedicalGPT and axolotl (by
    # default) resize to exactly len(tokenizer)
    assert {name: preset(name).pad_to_multiple_of for name in ("llama-factory", "xtuner-llava", "autotrain", "medicalgpt", "axolotl")} == {
        "llama-factory": 64, "xtuner-llava": 64, "autotrain": None, "medicalgpt": None, "axolotl": None}
    assert preset("axolotl").dtype == "bfloat16"  # axolotl merge-lora casts to the bf16 training dtype
    assert preset("medicalgpt").tokenizer == "adapter"  # the extended tokenizer, never the base's
    assert preset("xtuner-llava").max_shard_size == "2GB"  # xtuner convert merge's default
    assert preset("llama-factory").max_shard_size == "5GB"  # llamafactory-cli export_size default


def test_unknown_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dtype: bfloat16\npad_multiple: 64\n")
    with pytest.raises(OptionsError, match=rf"^config file {bad}: unknown option 'pad_multiple'; known options are create_pr, device, device_map, dtype, "):
        MergeOptions.from_mapping(load_config_file(bad), f"config file {bad}")


def test_unknown_key_through_the_cli(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dtype: bfloat16\nmerge_method: memory_efficient\n")
    code = main(["inspect", "--adapter", str(tmp_path / "never-read"), "--config", str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: config file {bad}: unknown option 'merge_method'; known options are ")


def test_bad_value_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("new_rows: random\n")
    with pytest.raises(OptionsError, match=r"^option new_rows: 'random' is not one of mean, zeros$"):
        MergeOptions.from_mapping(load_config_file(bad))


def test_not_a_mapping(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- dtype\n")
    with pytest.raises(OptionsError, match="expected a mapping of option: value, found list"):
        load_config_file(bad)


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("dtype: bfloat16\npad_to_multiple_of: 64\nvalidate: full\n")
    args = build_parser("merge").parse_args(["--base", "b", "--adapter", "a", "--out", "o", "--config", str(path),
                                              "--dtype", "float16", "--pad-to-multiple-of", "8"])
    options = resolve_options(args)
    assert (options.dtype, options.pad_to_multiple_of, options.validate) == ("float16", 8, "full")
    args = build_parser("merge").parse_args(["--base", "b", "--adapter", "a", "--out", "o"])
    assert resolve_options(args) == MergeOptions()


@pytest.fixture(scope="module")
def lora_only_pair(tmp_path_factory):
    """A base and an adapter trained after adding 3 tokens whose tensors do not fix the rows (LoRA
    pairs only, no embedding saved), so the pad multiple decides them."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from merger.demo import build_tokenizer

    folder = tmp_path_factory.mktemp("configs")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    tok = build_tokenizer()
    model.save_pretrained(folder / "base")
    tok.save_pretrained(folder / "base")
    tok.add_special_tokens({"additional_special_tokens": ["<a>", "<b>", "<c>"]})
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(folder / "adapter", save_embedding_layers=False)
    tok.save_pretrained(folder / "adapter")
    return folder / "base", folder / "adapter"


@pytest.mark.parametrize(("flags", "rows"), [([], 128), (["--pad-to-multiple-of", "8"], 72)], ids=["preset", "flag-wins"])
def test_a_preset_reaches_the_plan_and_a_flag_beats_it(lora_only_pair, capsys, flags, rows):
    base, adapter = lora_only_pair
    code = main(["inspect", "--base", str(base), "--adapter", str(adapter), "--json",
                 "--config", str(CONFIG_DIR / "llama-factory.yaml"), *flags])
    plan = json.loads(capsys.readouterr().out)
    assert code == 0
    assert (plan["embed"]["rows"], plan["embed"]["tokenizer_len"], plan["head"]["rows"]) == (rows, 67, rows)
