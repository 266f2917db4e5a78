"""Real third-party tokenizers, configs and adapters from ../shared/real-data (skipped when absent).

Never copied into the project: read in place, decompressed into tmp folders where needed.
"""

import json
import lzma
import shutil
from pathlib import Path

import pytest
import torch

from merger import merge_adapter
from merger.adapter import check_config, read_adapter_config
from merger.checkpoint import inspect_checkpoint_folder
from merger.errors import AdapterError, CheckpointError
from merger.tokenizer_facts import read_tokenizer_facts

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "real-data"
pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason="../shared/real-data is not present in this clone")


def real(*parts) -> Path:
    return REAL.joinpath(*parts)


def test_every_real_adapter_config_is_read_or_refused_clearly():
    for folder in sorted(real("adapter_configs").iterdir()):
        if folder.name.startswith("NOT-PEFT"):
            with pytest.raises(AdapterError, match="no 'peft_type' key.*MLX-LM"):
                read_adapter_config(folder)
            continue
        config = read_adapter_config(folder)
        assert check_config(config, folder / "adapter_config.json") == [], folder.name


def test_malformed_real_config_names_the_file_and_position(tmp_path):
    base = tmp_path / "lisa"
    base.mkdir()
    shutil.copyfile(real("configs", "lisa-7b-llava-32004.config.json"), base / "config.json")
    with pytest.raises(CheckpointError, match=r"config.json: malformed config JSON at line \d+ column \d+ \(Extra data\)"):
        inspect_checkpoint_folder(base)


@pytest.mark.parametrize(
    "name, length, bound",
    [("llama2-7b-chat", 32000, 32000), ("llava-1.5-7b-hf", 32002, 32002), ("qwen2", 151646, 151646),
     ("llama3-8b", 128256, 128256), ("infimm-zephyr-added-tokens", 32002, 32002)],
)
def test_real_tokenizer_lengths_match_transformers(name, length, bound):
    from transformers import AutoTokenizer

    facts = read_tokenizer_facts(real("tokenizers", name))
    assert (facts.length, facts.id_bound) == (length, bound)
    assert len(AutoTokenizer.from_pretrained(real("tokenizers", name))) == length


def _unpack(name: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for src in real("tokenizers", name).iterdir():
        if src.suffix == ".xz":
            (dest / src.stem).write_bytes(lzma.decompress(src.read_bytes()))
        else:
            shutil.copyfile(src, dest / src.name)
    return dest


@pytest.fixture(scope="module")
def gpt2_base(tmp_path_factory):
    """A random GPT-2 with the real 124M shape, so the real GPT-2 adapters fit it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("gpt2") / "base"
    torch.manual_seed(0)
    config = GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(folder)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(real("models", "tiny-gpt2", name), folder / name)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["gpt2-tigrinya-lora", "gpt2-attn-prefixed-lora"])
def test_real_gpt2_conv1d_adapters_merge_and_match_peft(gpt2_base, adapter, tmp_path):
    result = merge_adapter(gpt2_base, real("adapters", adapter), tmp_path / "out", validate="full")
    assert result.validation.ok, result.validation.findings
    assert result.validation.metrics["logits_checked"] is True
    assert result.validation.metrics["max_rel_error_logits"] < 1e-4
    assert result.plan.embed.rows == 50257 and result.plan.tie_word_embeddings is True
    lora_modules = sum(1 for op in result.plan.ops if op.lora)
    assert lora_modules == {"gpt2-tigrinya-lora": 36, "gpt2-attn-prefixed-lora": 24}[adapter]
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(result.out)) == 50257


@pytest.mark.slow
def test_real_seqcls_adapter_gets_its_classifier_head(gpt2_base, tmp_path):
    result = merge_adapter(gpt2_base, real("adapters", "gpt2-seqcls-lora"), tmp_path / "out", validate="full")
    assert result.validation.ok and result.validation.metrics["logits_checked"]
    config = json.loads((result.out / "config.json").read_text())
    assert config["num_labels"] == 6 and config["architectures"] == ["GPT2ForSequenceClassification"]
    from safetensors import safe_open
    from safetensors.torch import load_file

    adapter_score = load_file(real("adapters", "gpt2-seqcls-lora", "adapter_model.safetensors"))["base_model.model.score.weight"]
    with safe_open(str(result.out / "model.safetensors"), "pt") as handle:
        assert torch.equal(handle.get_tensor("score.weight"), adapter_score)


def _tiny_from_real_config(config_path: Path, dest: Path, **shrink):
    """A random model with a real config's vocabulary and layout, shrunk in width and depth."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    data = json.loads(config_path.read_text())
    text = data.get("text_config", data)
    text.update(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, **shrink)
    if "vision_config" in data:
        data["vision_config"].update(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    dest.mkdir(parents=True)
    (dest / "config.json").write_text(json.dumps(data))
    config = AutoConfig.from_pretrained(dest)
    cls = AutoModelForImageTextToText if "vision_config" in data else AutoModelForCausalLM
    torch.manual_seed(0)
    model = cls.from_config(config)
    model.save_pretrained(dest)
    return model


@pytest.mark.slow
def test_real_llava_config_and_tokenizer_story(tmp_path):
    """LLaVA-1.5: 32002 tokens in 32064 rows; an adapter with modules_to_save keeps both, text_config in sync."""
    from peft import LoraConfig, get_peft_model

    base = tmp_path / "llava"
    model = _tiny_from_real_config(real("configs", "llava-1.5-7b-hf", "config.json"), base)
    _unpack("llava-1.5-7b-hf", base)
    adapter = tmp_path / "adapter"
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"]))
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    peft_model.save_pretrained(adapter)
    _unpack("llava-1.5-7b-hf", adapter)
    result = merge_adapter(base, adapter, tmp_path / "out", validate="full")
    assert result.plan.embed.story == "embed_tokens: 32064 rows = 32002 tokens padded to a multiple of 64 (base: 32064), from the adapter's tensors"
    config = json.loads((result.out / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == 32064
    assert result.validation.ok and result.validation.metrics["logits_checked"]


@pytest.mark.slow
def test_real_qwen2_padded_base_is_not_shrunk(tmp_path):
    """Qwen2: 151936 rows for 151646 tokens. Two added tokens fit in the padding: no resize, still tied."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    base = tmp_path / "qwen2"
    model = _tiny_from_real_config(real("configs", "qwen2-1.5b-instruct-boundless.config.json"), base)
    _unpack("qwen2", base)
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_tokens(["<think>", "</think>"])
    adapter = tmp_path / "adapter"
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(adapter)
    tok.save_pretrained(adapter)
    result = merge_adapter(base, adapter, tmp_path / "out", validate="full")
    assert result.plan.embed.rows == 151936 and not result.plan.embed.changed
    assert "never shrunk" in result.plan.embed.story
    assert result.plan.tie_word_embeddings == json.loads((base / "config.json").read_text()).get("tie_word_embeddings", True)
    assert len(AutoTokenizer.from_pretrained(result.out)) == 151648
    assert result.validation.ok


@pytest.mark.parametrize(
    "config, message",
    [("mineru2-qwen2-vlm-151654.config.json", "transformers does not know model_type 'mineru2_qwen'"),
     ("infimm-zephyr.config.json", "the base runs its own code (modeling_infimm_zephyr.InfiMMZephyrModel); pass --trust-remote-code")],
)
def test_real_configs_transformers_cannot_build_get_one_line(config, message, tmp_path, capsys):
    """Never transformers' interactive trust prompt (it would hang a pipeline): one line, exit 2."""
    from merger.cli import main
    from merger.demo import build_demo_pair

    _, adapter = build_demo_pair(tmp_path / "pair")
    base = tmp_path / "base"
    base.mkdir()
    shutil.copyfile(real("configs", config), base / "config.json")
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": torch.zeros(4, 2)}, base / "model.safetensors")
    capsys.readouterr()  # building the demo pair may draw transformers' save progress bar
    assert main(["--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
