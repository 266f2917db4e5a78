"""Quantized official bases (block-FP8 as Qwen3-FP8 / DeepSeek-V3 ship, MXFP4 as gpt-oss ships) merged
through their dequantized values, written as bf16 without a quantization_config.

The bases are written here in the exact on-disk format transformers reads: a random bf16 model
quantized by the format's definition (FP8: per block, scale_inv = amax / 448, values rounded to
float8_e4m3fn; partial edge blocks cut at the matrix's edge; MXFP4: random FP4 codes and E8M0
exponents). Adapters are trained with PEFT on transformers' own dequantized load
(``FineGrainedFP8Config(dequantize=True)`` / ``Mxfp4Config(dequantize=True)``), as axolotl and
unsloth train on these bases.

What is proven: the output is bf16 with no quantization_config; its logits equal PEFT's unmerged
adapter on transformers' dequantized base (bf16 tolerance 3e-2 of the logits' range, validation's
own: the merged weight is rounded to bf16 once where PEFT adds a bf16 LoRA product to a bf16 matmul;
measured 0.5-1.5e-2); tensors the adapter leaves alone equal transformers' dequantized parameters
bit for bit; every stored tensor is consumed once; the plan says what was dequantized; files that
do not fit together are refused in one line with exit 2 and nothing written.

Validation reads the base through ``dequant_source.dequantized_reference`` (validate.open_base), a
path that shares no code with the stream engine's dequantizing reader.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import merger
from merger.checkpoint import inspect_checkpoint_folder
from merger.cli import main
from merger.engines.dequant_source import DequantizedFiles, DequantizedLibrary
from merger.quantized import dequantize_fp8

from .factories import make_tokenizer, mxfp4_checkpoint, perturb_trainable

BF16_LOGITS_TOL = 3e-2  # validate.LOW_PRECISION_REL_TOL["bfloat16"]: relative to the logits' range
FP8_MAX = 448.0  # largest finite float8_e4m3fn
LORA_TARGETS = ["q_proj", "v_proj", "down_proj"]  # gate_proj, up_proj, k_proj, o_proj are copied


# --------------------------------------------------------------------------- bases, by the formats' definitions


def quantize_fp8_blocks(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-FP8 as DeepSeek's and Qwen's converters write it: one float32 scale_inv = amax / 448 per block."""
    rows, cols = weight.shape
    grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    scale = torch.empty(grid, dtype=torch.float32)
    quantized = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(grid[0]):
        for j in range(grid[1]):
            cut = (slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1]))
            values = weight[cut].float()
            scale[i, j] = values.abs().max().clamp(min=1e-12) / FP8_MAX
            quantized[cut] = (values / scale[i, j]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return quantized, scale


def dequantize_by_definition(quantized: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Block by block with plain loops: shares nothing with merger.quantized."""
    out = quantized.to(torch.float32)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] *= scale[i, j]
    return out


def write_fp8_qwen3(folder: Path, *, intermediate: int, block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """A tiny Qwen3 stored as Qwen3-FP8 is: every decoder projection block-FP8, the rest bf16."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=intermediate, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=False,
                         max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    stored = {}
    for key, value in Qwen3ForCausalLM(config).to(torch.bfloat16).state_dict().items():
        if key.endswith("proj.weight"):
            stored[key], stored[key + "_scale_inv"] = quantize_fp8_blocks(value, block)
        else:
            stored[key] = value.contiguous()
    folder.mkdir(parents=True)
    save_file(stored, str(folder / "model.safetensors"), metadata={"format": "pt"})
    quant = {"quant_method": "fp8", "weight_block_size": list(block), "activation_scheme": "dynamic", "fmt": "e4m3"}
    config_dict = {**config.to_dict(), "architectures": ["Qwen3ForCausalLM"], "dtype": "bfloat16", "quantization_config": quant}
    (folder / "config.json").write_text(json.dumps(config_dict))
    make_tokenizer(64).save_pretrained(folder)
    return stored


def write_mxfp4_gpt_oss(folder: Path) -> dict[str, torch.Tensor]:
    """A tiny gpt-oss as OpenAI ships it: experts only as MXFP4 blocks and scales, the rest bf16."""
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_local_experts=4,
                          num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"], sliding_window=8,
                          max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                          pad_token_id=0)
    torch.manual_seed(0)
    stored = mxfp4_checkpoint(GptOssForCausalLM(config), scales=(118, 124))
    folder.mkdir(parents=True)
    save_file(stored, str(folder / "model.safetensors"), metadata={"format": "pt"})
    quant = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    config_dict = {**config.to_dict(), "architectures": ["GptOssForCausalLM"], "dtype": "bfloat16", "quantization_config": quant}
    (folder / "config.json").write_text(json.dumps(config_dict))
    make_tokenizer(64).save_pretrained(folder)
    return stored


def transformers_dequantized(folder: Path):
    """The base as transformers dequantizes it on load (bf16, CPU): what the adapters are trained on."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config, Mxfp4Config

    method = json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"]
    quant = FineGrainedFP8Config(dequantize=True) if method == "fp8" else Mxfp4Config(dequantize=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=torch.bfloat16,
                                                    trust_remote_code=False).eval()


def by_definition_model(folder: Path, stored: dict[str, torch.Tensor], block: tuple[int, int]):
    """The base with every FP8 weight dequantized by dequantize_by_definition (transformers cannot load it)."""
    from transformers import AutoConfig, Qwen3ForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    del config.quantization_config
    state = {key: (dequantize_by_definition(value, stored[key + "_scale_inv"], block).to(torch.bfloat16)
                   if key + "_scale_inv" in stored else value)
             for key, value in stored.items() if not key.endswith("_scale_inv")}
    return Qwen3ForCausalLM.from_pretrained(None, config=config, state_dict=state, dtype=torch.bfloat16,
                                            trust_remote_code=False).eval()


def train_adapter(model, folder: Path, base: Path, *, targets: list[str], tokens: bool = False) -> None:
    """PEFT on the dequantized model; ``tokens``: two added tokens, embedding and head in modules_to_save."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=False)
    extra = {}
    if tokens:
        tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        extra = {"modules_to_save": ["embed_tokens", "lm_head"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, **extra))
        perturb_trainable(peft_model, seed=1)
        peft_model.save_pretrained(folder)
    if tokens:
        tokenizer.save_pretrained(folder)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fp8_case(tmp_path_factory):
    """Block-FP8 Qwen3 in 16x16 blocks with every dimension a multiple of 16 (transformers loads it
    right), an ordinary LoRA adapter and one with added tokens and modules_to_save embed/head."""
    root = tmp_path_factory.mktemp("fp8")
    with torch.random.fork_rng():
        stored = write_fp8_qwen3(root / "base", intermediate=48, block=(16, 16))
        train_adapter(transformers_dequantized(root / "base"), root / "lora", root / "base", targets=LORA_TARGETS)
        train_adapter(transformers_dequantized(root / "base"), root / "tokens", root / "base", targets=["q_proj", "v_proj"],
                      tokens=True)
    return root, stored


@pytest.fixture(scope="module")
def partial_case(tmp_path_factory):
    """Block-FP8 Qwen3 whose MLP (40 wide) ends in partial 16x16 blocks: transformers cannot load it."""
    root = tmp_path_factory.mktemp("fp8-partial")
    with torch.random.fork_rng():
        stored = write_fp8_qwen3(root / "base", intermediate=40, block=(16, 16))
        train_adapter(by_definition_model(root / "base", stored, (16, 16)), root / "lora", root / "base",
                      targets=LORA_TARGETS)
    return root, stored


@pytest.fixture(scope="module")
def gpt_oss_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("mxfp4")
    with torch.random.fork_rng():
        stored = write_mxfp4_gpt_oss(root / "base")
        train_adapter(transformers_dequantized(root / "base"), root / "lora", root / "base",
                      targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    return root, stored


# --------------------------------------------------------------------------- what the output must be


def output_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    return tensors


def assert_full_precision_output(out: Path) -> dict[str, torch.Tensor]:
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert all("quantization_config" not in level for level in config.values() if isinstance(level, dict))
    tensors = output_tensors(out)
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.bfloat16}
    assert not [key for key in tensors if key.endswith(("_scale_inv", "_blocks", "_scales", "activation_scale"))]
    return tensors


def probe_ids() -> torch.Tensor:
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(7))
    ids[0, 3], ids[1, 5] = 64, 65  # the added tokens, where the model has them (clamped below otherwise)
    return ids


def logits_error(out: Path, reference_base, adapter: Path) -> float:
    """max |merged - PEFT(base + unmerged adapter)| over the largest |reference logit|."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rows = json.loads((out / "config.json").read_text())["vocab_size"]
    ids = probe_ids().clamp(max=rows - 1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if reference_base.get_input_embeddings().weight.shape[0] != rows:
            reference_base.resize_token_embeddings(rows, mean_resizing=False)
        reference = PeftModel.from_pretrained(reference_base, adapter).eval()(input_ids=ids).logits.float()
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, trust_remote_code=False).eval()
        got = merged(input_ids=ids).logits.float()
    return float((got - reference).abs().max() / reference.abs().max())


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype == torch.bfloat16 and actual.shape == expected.shape
    assert torch.equal(actual.view(torch.int16), expected.contiguous().view(torch.int16))


# --------------------------------------------------------------------------- FP8


@pytest.mark.parametrize("adapter", ["lora", "tokens"])
def test_fp8_base_merges_to_bf16_equal_to_peft_on_transformers_dequantized_base(fp8_case, tmp_path, adapter):
    root, stored = fp8_case
    out = tmp_path / "out"
    result = merger.merge_adapter(root / "base", root / adapter, out, engine="stream", validate="full", quiet=True)
    assert result.validation.ok and result.validation.metrics["logits_checked"], result.validation
    assert result.validation.metrics["max_rel_error_logits"] <= BF16_LOGITS_TOL
    tensors = assert_full_precision_output(out)
    dequantized = transformers_dequantized(root / "base").state_dict()
    # the untouched projections are transformers' dequantized parameters, bit for bit
    copied = [k for k in stored if k.endswith(("gate_proj.weight", "up_proj.weight", "k_proj.weight", "o_proj.weight"))]
    assert len(copied) == 8
    for key in copied:
        assert_bits_equal(tensors[key], dequantized[key])
    assert set(tensors) == set(dequantized)
    assert logits_error(out, transformers_dequantized(root / "base"), root / adapter) <= BF16_LOGITS_TOL
    if adapter == "tokens":
        assert tensors["model.embed_tokens.weight"].shape[0] == 66 and tensors["lm_head.weight"].shape[0] == 66


def test_fp8_plan_reads_every_stored_tensor_once_and_says_what_it_dequantized(fp8_case):
    root, stored = fp8_case
    plan = merger.inspect_adapter(root / "base", root / "lora")
    view = plan.base.quantized
    assert sorted(key for entry in view.logical.values() for key in entry.consumed) == sorted(stored)
    assert len(view.dequantized) == 14 and view.partial_blocks == []
    assert plan.dtype == plan.base.dtype == "bfloat16" and not plan.problems
    assert plan.base.tensors["model.layers.0.mlp.gate_proj.weight"].shape == (48, 32)
    assert plan.base.tensors["model.layers.0.mlp.gate_proj.weight"].dtype == "BF16"
    assert "model.layers.0.mlp.gate_proj.weight_scale_inv" not in plan.base.tensors
    assert plan.config_edits["quantization_config"] is None and plan.config_edits["dtype"] == "bfloat16"
    assert ("dequantized block-FP8 (16x16 blocks) to bfloat16 by the format's definition (14 tensors, every stored "
            "tensor read once); quantization_config removed: the output is a full-precision checkpoint, never quantized "
            "values with the update folded in") in plan.notes


def test_fp8_peft_engine_loads_transformers_dequantization(fp8_case, tmp_path):
    root, _ = fp8_case
    out = tmp_path / "out"
    result = merger.merge_adapter(root / "base", root / "tokens", out, engine="peft", validate="full", quiet=True)
    assert result.engine == "peft" and result.validation.ok, result.validation
    assert result.validation.metrics["max_rel_error_logits"] <= BF16_LOGITS_TOL
    assert_full_precision_output(out)


def test_fp8_partial_edge_blocks_merge_by_the_definition(partial_case, tmp_path):
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    root, stored = partial_case
    # transformers 5 derives the block from the scale grid (40 rows / 3 block rows): it refuses this file
    with pytest.raises(Exception), warnings.catch_warnings():  # noqa: B017 - whichever error transformers raises
        warnings.simplefilter("ignore")
        AutoModelForCausalLM.from_pretrained(root / "base", quantization_config=FineGrainedFP8Config(dequantize=True),
                                             dtype=torch.bfloat16, trust_remote_code=False)
    out = tmp_path / "out"
    result = merger.merge_adapter(root / "base", root / "lora", out, engine="stream", validate="full", quiet=True)
    assert result.validation.ok and result.validation.metrics["logits_checked"], result.validation
    assert any("6 tensors end in partial blocks (e.g. model.layers.0.mlp.down_proj.weight [32, 40])" in n
               for n in result.plan.notes), result.plan.notes
    tensors = assert_full_precision_output(out)
    for key in ("model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        expected = dequantize_by_definition(stored[key], stored[key + "_scale_inv"], (16, 16)).to(torch.bfloat16)
        assert_bits_equal(tensors[key], expected)
    assert logits_error(out, by_definition_model(root / "base", stored, (16, 16)), root / "lora") <= BF16_LOGITS_TOL
    peft_out = tmp_path / "peft"
    assert merger.merge_adapter(root / "base", root / "lora", peft_out, engine="peft", validate="full", quiet=True).validation.ok
    assert_bits_equal(output_tensors(peft_out)["model.layers.0.mlp.gate_proj.weight"],
                      tensors["model.layers.0.mlp.gate_proj.weight"])


# --------------------------------------------------------------------------- MXFP4 (gpt-oss)


def test_gpt_oss_mxfp4_base_merges_to_bf16_equal_to_peft_on_transformers_dequantized_base(gpt_oss_case,
                                                                                          tmp_path):
    root, stored = gpt_oss_case
    out = tmp_path / "out"
    result = merger.merge_adapter(root / "base", root / "lora", out, engine="stream", validate="full", quiet=True)
    assert result.validation.ok and result.validation.metrics["logits_checked"], result.validation
    view = result.plan.base.quantized
    assert sorted(key for entry in view.logical.values() for key in entry.consumed) == sorted(stored)
    assert any(n.startswith("dequantized MXFP4 (FP4 values in groups of 32 sharing an E8M0 scale) to bfloat16 by the "
                            "format's definition (4 tensors") for n in result.plan.notes)
    tensors = assert_full_precision_output(out)
    dequantized = transformers_dequantized(root / "base").state_dict()
    assert set(tensors) == set(dequantized)
    for key in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
        assert_bits_equal(tensors[key], dequantized[key])
    assert logits_error(out, transformers_dequantized(root / "base"), root / "lora") <= BF16_LOGITS_TOL


def test_gpt_oss_peft_engine(gpt_oss_case, tmp_path):
    root, _ = gpt_oss_case
    result = merger.merge_adapter(root / "base", root / "lora", tmp_path / "out", engine="peft", validate="full", quiet=True)
    assert result.validation.ok, result.validation
    assert_full_precision_output(tmp_path / "out")


# --------------------------------------------------------------------------- the readers, block by block


def write_synthetic(folder: Path, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A matrix and stacked experts in 16x16 blocks with partial edges, scales stored in ``scale_dtype``."""
    generator = torch.Generator().manual_seed(3)
    weight = (torch.randn(40, 24, generator=generator) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    experts = (torch.randn(3, 40, 24, generator=generator) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    if scale_dtype == torch.float8_e8m0fnu:
        grid = torch.randint(115, 135, (3, 2), generator=generator, dtype=torch.uint8).view(torch.float8_e8m0fnu)
        stacked = torch.randint(115, 135, (3, 3, 2), generator=generator, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    else:
        grid = (torch.rand(3, 2, generator=generator) * 0.01 + 1e-4).to(scale_dtype)
        stacked = (torch.rand(3, 3, 2, generator=generator) * 0.01 + 1e-4).to(scale_dtype)
    stored = {"a.weight": weight, "a.weight_scale_inv": grid, "experts.w": experts, "experts.w_scale_inv": stacked,
              "norm.weight": torch.ones(24, dtype=torch.bfloat16)}
    folder.mkdir()
    save_file({k: v for k, v in stored.items() if k.startswith("a.")}, str(folder / "one.safetensors"))
    save_file({k: v for k, v in stored.items() if not k.startswith("a.")}, str(folder / "two.safetensors"))
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "qwen3", "quantization_config": {"quant_method": "fp8", "weight_block_size": [16, 16]}}))
    return stored


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float8_e8m0fnu])
def test_readers_give_the_whole_tensor_in_any_row_blocks(tmp_path, scale_dtype):
    stored = write_synthetic(tmp_path / "base", scale_dtype)
    base = inspect_checkpoint_folder(tmp_path / "base")
    assert set(base.tensors) == {"a.weight", "experts.w", "norm.weight"} and base.dtype == "bfloat16"
    files, library = DequantizedFiles(base), DequantizedLibrary(base)
    try:
        for key, expected in (("a.weight", dequantize_fp8(stored["a.weight"], stored["a.weight_scale_inv"], (16, 16))),
                              ("experts.w", dequantize_fp8(stored["experts.w"], stored["experts.w_scale_inv"], (16, 16)))):
            assert files.torch_dtype(key) == torch.float32 and files.rows(key) == expected.shape[0]
            for step in (1, 7, 16, 17, expected.shape[0]):
                for start in range(0, expected.shape[0], step):
                    stop = min(expected.shape[0], start + step)
                    into = torch.empty((stop - start,) + tuple(expected.shape[1:]))
                    files.read_rows(key, start, stop, into)
                    assert torch.equal(into, expected[start:stop])
                    assert torch.equal(library.slice(key, start, stop), expected[start:stop])
            assert torch.equal(files.read(key), expected) and torch.equal(library.read(key), expected)
            assert torch.equal(library.slice(key, 1), expected[1])
            assert torch.equal(library.pieces(key, [(slice(None), slice(3, 9))])[0], expected[:, 3:9])
            bf16 = torch.empty(expected.shape, dtype=torch.bfloat16)  # a caller's buffer in another dtype
            files.read_rows(key, 0, expected.shape[0], bf16)
            assert torch.equal(bf16, expected.to(torch.bfloat16))
        assert torch.equal(files.read("norm.weight"), stored["norm.weight"])
        assert torch.equal(library.read("norm.weight"), stored["norm.weight"])
    finally:
        files.close()


def test_per_tensor_fp8_reader_drops_activation_scales(tmp_path):
    generator = torch.Generator().manual_seed(4)
    weight = (torch.randn(40, 24, generator=generator) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    stored = {"a.weight": weight, "a.weight_scale_inv": torch.tensor(0.0123), "a.activation_scale": torch.tensor(0.5)}
    (tmp_path / "base").mkdir()
    save_file(stored, str(tmp_path / "base" / "model.safetensors"))
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "qwen3", "quantization_config": {
        "quant_method": "fp8", "weight_block_size": None, "activation_scheme": "static"}}))
    base = inspect_checkpoint_folder(tmp_path / "base")
    assert list(base.tensors) == ["a.weight"] and base.quantized.description == "per-tensor FP8"
    assert base.quantized.logical["a.weight"].consumed == ("a.weight", "a.weight_scale_inv", "a.activation_scale")
    expected = weight.float() * torch.tensor(0.0123)
    files = DequantizedFiles(base)
    into = torch.empty(17, 24)
    files.read_rows("a.weight", 20, 37, into)
    files.close()
    assert torch.equal(into, expected[20:37])
    assert torch.equal(DequantizedLibrary(base).slice("a.weight", 20, 37), expected[20:37])


def test_fp8_rows_into_a_wrong_buffer_are_refused():
    from merger.quantized import QuantizedFormatError, dequantize_fp8_rows

    weight = torch.zeros(4, 4, dtype=torch.float8_e4m3fn)
    with pytest.raises(QuantizedFormatError) as error:
        dequantize_fp8_rows(weight, torch.ones(1, 1), (4, 4), 0, name="w", out=torch.empty(4, 4, dtype=torch.bfloat16))
    assert str(error.value) == ("w: out is torch.bfloat16 (4, 4), expected torch.float32 (4, 4) (the rows' shape); "
                                "pass a matching buffer")


# --------------------------------------------------------------------------- refusals


def break_missing_scale(base: Path) -> None:
    rewrite(base, lambda t: t.pop("model.layers.1.mlp.up_proj.weight_scale_inv"))


def break_scale_grid(base: Path) -> None:
    rewrite(base, lambda t: t.update({"model.layers.0.self_attn.q_proj.weight_scale_inv": torch.ones(2, 1)}))


def break_config(base: Path) -> None:
    config = json.loads((base / "config.json").read_text())
    del config["quantization_config"]
    (base / "config.json").write_text(json.dumps(config))


def break_block_size(base: Path) -> None:
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [16]
    (base / "config.json").write_text(json.dumps(config))


def rewrite(base: Path, change) -> None:
    path = base / "model.safetensors"
    with safe_open(str(path), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize(("breakage", "message"), [
    (break_missing_scale, "model.layers.1.mlp.up_proj.weight: F8_E4M3 weight without its scale "
                          "model.layers.1.mlp.up_proj.weight_scale_inv, expected both in the checkpoint; the checkpoint "
                          "is corrupt or incomplete: download it again"),
    (break_scale_grid, "model.layers.0.self_attn.q_proj.weight_scale_inv: scale grid (2, 1) for weight "
                       "model.layers.0.self_attn.q_proj.weight (32, 32), expected (2, 2) (ceil(rows/16) x ceil(cols/16)); "
                       "check quantization_config.weight_block_size in config.json"),
    (break_config, "stored as F8_E4M3 but config.json has no quantization_config; expected one with quant_method 'fp8': "
                   "restore the checkpoint's config.json"),
    (break_block_size, "config.json: quantization_config.weight_block_size is [16], expected two positive integers "
                       "[rows, cols] or null (per-tensor scales): fix config.json"),
], ids=["missing-scale", "scale-grid", "config-without-quantization", "block-size"])
def test_inconsistent_quantized_base_is_refused_in_one_line(fp8_case, tmp_path, capsys, breakage, message):
    root, _ = fp8_case
    base = tmp_path / "base"
    shutil.copytree(root / "base", base)
    breakage(base)
    out = tmp_path / "out"
    code = main(["--base", str(base), "--adapter", str(root / "lora"), "--out", str(out)])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert f"{base}: " in lines[0] and message in lines[0], lines[0]
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_mxfp4_blocks_without_scales_are_refused(gpt_oss_case, tmp_path, capsys):
    root, _ = gpt_oss_case
    base = tmp_path / "base"
    shutil.copytree(root / "base", base)
    rewrite(base, lambda t: t.pop("model.layers.1.mlp.experts.down_proj_scales"))
    out = tmp_path / "out"
    code = main(["--base", str(base), "--adapter", str(root / "lora"), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert err == (f"error: {base}: model.layers.1.mlp.experts.down_proj_blocks: MXFP4 blocks without their scales "
                   "model.layers.1.mlp.experts.down_proj_scales, expected both in the checkpoint; the checkpoint is "
                   "corrupt or incomplete: download it again")
    assert not out.exists()


def test_validation_reads_the_dequantized_base(fp8_case, tmp_path):
    root, _ = fp8_case
    result = merger.merge_adapter(root / "base", root / "lora", tmp_path / "out", engine="stream", validate="fast",
                                  quiet=True)
    assert result.validation.ok
