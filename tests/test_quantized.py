"""merger.quantized against transformers' own readers of the same files.

Exactness: every comparison with transformers is bit for bit (integer views of the float tensors, so
-0.0, inf and NaN payloads count). Both compute the same float32 products (FP8: weight * scale, one
rounding; MXFP4: FP4 value * 2**e, exact), so there is no tolerance to justify.
"""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from merger.errors import MergerError
from merger.quantized import (
    RECIPE_FP8_BLOCK,
    RECIPE_FP8_TENSOR,
    RECIPE_MXFP4,
    RECIPE_PLAIN,
    Nf4UnavailableError,
    QuantizedFormatError,
    dequantize_fp8,
    dequantize_fp8_rows,
    dequantize_mxfp4,
    dequantize_mxfp4_experts,
    nf4_round_trip,
    quantized_tensor_map,
)

from .factories import mxfp4_checkpoint

REDOWNLOAD = "the checkpoint is corrupt or incomplete: download it again"


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    as_int = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[actual.dtype]
    assert torch.equal(actual.contiguous().view(as_int), expected.contiguous().view(as_int))


def fp8_weight(*shape: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)


def fp8_scale(*shape: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=generator) * 0.01 + 1e-4


def block_reference(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """By the definition, block by block: the last row/column of blocks is cut at the matrix's edge."""
    out = weight.to(torch.float32)
    rows, cols = out.shape
    for i in range(math.ceil(rows / block[0])):
        for j in range(math.ceil(cols / block[1])):
            out[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] *= scale[i, j]
    return out


def headers(path) -> dict[str, tuple[tuple[int, ...], str]]:
    with safe_open(str(path), "pt") as handle:
        return {key: (tuple(handle.get_slice(key).get_shape()), handle.get_slice(key).get_dtype())
                for key in handle.keys()}


def dequantize_entry(entry, stored: dict[str, torch.Tensor]) -> torch.Tensor:
    """What a streaming engine does with one quantized_tensor_map entry."""
    if entry.recipe == RECIPE_PLAIN:
        return stored[entry.sources[0]]
    if entry.recipe == RECIPE_MXFP4:
        return dequantize_mxfp4(*(stored[key] for key in entry.sources), name=entry.sources[0])
    return dequantize_fp8(*(stored[key] for key in entry.sources), entry.block_size, name=entry.name)


# --------------------------------------------------------------------------- FP8 against transformers


def write_fp8_qwen3(folder, block: list[int] | None) -> dict[str, torch.Tensor]:
    """A tiny Qwen3 stored as Qwen3-FP8 is (block scales), or with per-tensor scales and static activation scales."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=False)
    torch.manual_seed(0)
    stored = {}
    for seed, (key, value) in enumerate(Qwen3ForCausalLM(config).state_dict().items()):
        if not key.endswith("proj.weight"):
            stored[key] = value.contiguous()
            continue
        rows, cols = value.shape
        stored[key] = fp8_weight(rows, cols, seed=seed)
        if block is None:
            stored[key + "_scale_inv"] = torch.tensor(0.0123 * (seed + 1))
            stored[key.removesuffix("weight") + "activation_scale"] = torch.tensor(0.5)
        else:
            stored[key + "_scale_inv"] = fp8_scale(math.ceil(rows / block[0]), math.ceil(cols / block[1]), seed=seed)
    save_file(stored, str(folder / "model.safetensors"), metadata={"format": "pt"})
    quant = {"quant_method": "fp8", "weight_block_size": block,
             "activation_scheme": "dynamic" if block else "static"}
    (folder / "config.json").write_text(json.dumps({**config.to_dict(), "quantization_config": quant}))
    return stored


@pytest.mark.parametrize("block", [[16, 16], None], ids=["block", "per-tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_checkpoint_matches_transformers_dequantized_load(tmp_path, block, dtype):
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    stored = write_fp8_qwen3(tmp_path, block)
    config = json.loads((tmp_path / "config.json").read_text())
    plan = quantized_tensor_map(config, headers(tmp_path / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=FineGrainedFP8Config(dequantize=True), dtype=dtype)
    loaded = model.state_dict()
    assert set(plan) == set(loaded)
    recipe = RECIPE_FP8_TENSOR if block is None else RECIPE_FP8_BLOCK
    assert {entry.recipe for entry in plan.values()} == {RECIPE_PLAIN, recipe}
    for name, entry in plan.items():
        assert entry.shape == tuple(loaded[name].shape)
        if entry.recipe != RECIPE_PLAIN:
            assert_bits_equal(dequantize_entry(entry, stored).to(dtype), loaded[name])
    # every stored tensor feeds exactly one output; the activation scales are consumed and dropped
    consumed = [key for entry in plan.values() for key in entry.consumed]
    assert sorted(consumed) == sorted(stored)


@pytest.mark.parametrize(("shape", "block"), [((80, 48), (32, 32)), ((48, 40), (32, 32)), ((5, 7), (2, 3)),
                                              ((64, 64), (32, 32)), ((3, 130), (128, 128))])
def test_fp8_partial_edge_blocks_match_transformers_block_dequant(shape, block):
    # transformers' load-time Fp8Dequantize derives the block from the grid (rows // grid rows), so it
    # refuses (80, 48) in 32x32 blocks and cuts (48, 40) into 24x20 blocks; the block-aware
    # _dequantize_fp8_weight (FP8Linear's backward) and the per-block definition agree with us
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    weight = fp8_weight(*shape)
    scale = fp8_scale(math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    ours = dequantize_fp8(weight, scale, block)
    assert_bits_equal(ours, _dequantize_fp8_weight(weight, scale, list(block), torch.float32))
    assert_bits_equal(ours, block_reference(weight, scale, block))


def test_fp8_stacked_experts_and_per_tensor_match_transformers():
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    experts, scale = fp8_weight(3, 40, 24), fp8_scale(3, 3, 2)
    assert_bits_equal(dequantize_fp8(experts, scale, (16, 16)),
                      _dequantize_fp8_weight(experts, scale, [16, 16], torch.float32))
    weight, one = fp8_weight(6, 10), torch.tensor(0.037)
    assert_bits_equal(dequantize_fp8(weight, one, None), _dequantize_fp8_weight(weight, one, None, torch.float32))


@pytest.mark.parametrize("scale_dtype", [torch.uint8, torch.float8_e8m0fnu, torch.bfloat16])
def test_fp8_e8m0_and_bf16_scales_match_transformers(scale_dtype):
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    weight = fp8_weight(64, 96)
    exponents = torch.randint(110, 140, (2, 3), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    scale = {torch.uint8: exponents, torch.float8_e8m0fnu: exponents.view(torch.float8_e8m0fnu),
             torch.bfloat16: fp8_scale(2, 3).to(torch.bfloat16)}[scale_dtype]
    expected = Fp8Dequantize(None)._dequantize_one(weight, scale, output_dtype=torch.float32)
    assert_bits_equal(dequantize_fp8(weight, scale, (32, 32)), expected)


@pytest.mark.parametrize("chunk", [1, 7, 32, 33, 100])
def test_fp8_row_ranges_equal_the_whole_tensor(chunk):
    weight, scale, block = fp8_weight(100, 70), fp8_scale(4, 3), (32, 32)
    whole = dequantize_fp8(weight, scale, block)
    streamed = torch.cat([dequantize_fp8_rows(weight[start:start + chunk], scale, block, start)
                          for start in range(0, 100, chunk)])
    assert_bits_equal(streamed, whole)
    assert_bits_equal(dequantize_fp8_rows(weight[40:41], scale, block, 40), whole[40:41])


# --------------------------------------------------------------------------- MXFP4 against transformers


def test_mxfp4_nibble_order_scale_and_transpose_by_hand():
    blocks = torch.zeros(1, 2, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0, 0] = 0x2F  # low nibble 0xF = -6.0 comes first, high nibble 0x2 = 1.0 second
    blocks[0, 1, 0, 15] = 0x70  # row 1: value 30 = +0.0, value 31 = 6.0
    scales = torch.tensor([[[128], [125]]], dtype=torch.uint8)  # 2**1 and 2**-2
    out = dequantize_mxfp4(blocks, scales)
    assert out.shape == (1, 32, 2)  # (experts, values per row, stored rows): each expert transposed
    assert out[0, :, 0].tolist() == [-12.0, 2.0] + [0.0] * 30
    assert out[0, :, 1].tolist() == [0.0] * 31 + [1.5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_matches_transformers_on_every_code(dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    generator = torch.Generator().manual_seed(0)
    blocks = torch.arange(256, dtype=torch.uint8).repeat(3 * 4 * 2 * 16 // 256 + 1)[:3 * 4 * 2 * 16]
    blocks = blocks[torch.randperm(blocks.numel(), generator=generator)].reshape(3, 4, 2, 16)
    scales = torch.tensor([0, 1, 2, 120, 127, 133, 200, 253, 254, 126, 127, 128] * 2, dtype=torch.uint8)
    scales = scales.reshape(3, 4, 2)  # from subnormal 2**-127 up to 6 * 2**127 = inf
    ours = dequantize_mxfp4(blocks, scales).to(dtype)
    assert_bits_equal(ours, convert_moe_packed_tensors(blocks, scales, dtype=dtype))


def write_mxfp4_gpt_oss(folder) -> dict[str, torch.Tensor]:
    """A tiny gpt-oss as OpenAI ships it: experts only as MXFP4 blocks and scales, the rest bf16."""
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_local_experts=3,
                          num_experts_per_tok=2, layer_types=["full_attention"])
    torch.manual_seed(0)
    stored = mxfp4_checkpoint(GptOssForCausalLM(config), scales=(117, 135))
    save_file(stored, str(folder / "model.safetensors"), metadata={"format": "pt"})
    quant = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps({**config.to_dict(), "quantization_config": quant}))
    return stored


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_checkpoint_matches_transformers_dequantized_load(tmp_path, dtype):
    from transformers import AutoModelForCausalLM, Mxfp4Config

    stored = write_mxfp4_gpt_oss(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    plan = quantized_tensor_map(config, headers(tmp_path / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=Mxfp4Config(dequantize=True),
                                                 dtype=dtype)
    loaded = model.state_dict()
    assert set(plan) == set(loaded)
    assert plan["model.layers.0.mlp.experts.gate_up_proj"].shape == (3, 64, 192)
    assert plan["model.layers.0.mlp.experts.down_proj"].sources == (
        "model.layers.0.mlp.experts.down_proj_blocks", "model.layers.0.mlp.experts.down_proj_scales")
    for name, entry in plan.items():
        assert entry.shape == tuple(loaded[name].shape)
        if entry.recipe == RECIPE_MXFP4:
            assert_bits_equal(dequantize_entry(entry, stored).to(dtype), loaded[name])
    assert sorted(key for entry in plan.values() for key in entry.consumed) == sorted(stored)


def test_mxfp4_expert_ranges_equal_the_whole_tensor():
    generator = torch.Generator().manual_seed(2)
    blocks = torch.randint(0, 256, (5, 6, 2, 16), generator=generator, dtype=torch.uint8)
    scales = torch.randint(120, 134, (5, 6, 2), generator=generator, dtype=torch.uint8)
    whole = dequantize_mxfp4(blocks, scales)
    streamed = torch.cat([dequantize_mxfp4_experts(blocks, scales, start, min(start + 2, 5))
                          for start in range(0, 5, 2)])
    assert_bits_equal(streamed, whole)


# --------------------------------------------------------------------------- refusals, messages pinned

FP8 = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
MXFP4 = {"quantization_config": {"quant_method": "mxfp4"}}
W = "model.layers.0.mlp.up_proj.weight"
P = "model.layers.0.mlp.experts.down_proj"


@pytest.mark.parametrize(("config", "tensors", "message"), [
    (FP8, {W: ((300, 200), "F8_E4M3"), W + "_scale_inv": ((2, 2), "F32")},
     f"{W}_scale_inv: scale grid (2, 2) for weight {W} (300, 200), expected (3, 2) (ceil(rows/128) x "
     f"ceil(cols/128)); check quantization_config.weight_block_size in config.json, or {REDOWNLOAD}"),
    (FP8, {W: ((300, 200), "F8_E4M3")},
     f"{W}: F8_E4M3 weight without its scale {W}_scale_inv, expected both in the checkpoint; {REDOWNLOAD}"),
    (FP8, {W: ((300, 200), "BF16"), W + "_scale_inv": ((3, 2), "F32")},
     f"{W}: BF16 (300, 200) with F32 scale {W}_scale_inv, expected an F8_E4M3 matrix with an F32, BF16, F16 or "
     "E8M0 scale (the FP8 layouts merger dequantizes): merge into the full-precision model"),
    (FP8, {"lm_head.weight": ((64, 32), "BF16"), W + "_scale_inv": ((3, 2), "F32")},
     f"{W}_scale_inv: a scale without its FP8 weight {W}, expected both in the checkpoint; {REDOWNLOAD}"),
    (FP8, {W: ((64, 32), "BF16"), "model.layers.0.mlp.up_proj.activation_scale": ((), "F32")},
     f"model.layers.0.mlp.up_proj.activation_scale: a scale without its FP8 weight {W}, expected both in the "
     f"checkpoint; {REDOWNLOAD}"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": None}},
     {W: ((64, 32), "F8_E4M3"), W + "_scale_inv": ((1, 2), "F32")},
     f"{W}_scale_inv: shape (1, 2) for weight {W} (64, 32), expected one number (weight_block_size is null: "
     "per-tensor scales); set quantization_config.weight_block_size to the checkpoint's blocks"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}}, {},
     "config.json: quantization_config.weight_block_size is [128], expected two positive integers [rows, cols] "
     "or null (per-tensor scales): fix config.json"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, {},
     "config.json: quantization_config.quant_method is 'gptq', expected 'fp8' or 'mxfp4' (the formats merger "
     "dequantizes): merge into the full-precision model instead"),
    ({}, {W: ((64, 32), "F8_E4M3")},
     f"{W}: stored as F8_E4M3 but config.json has no quantization_config; expected one with quant_method 'fp8': "
     "restore the checkpoint's config.json"),
    (MXFP4, {P + "_blocks": ((3, 64, 3, 16), "U8"), P + "_scales": ((3, 64, 2), "U8")},
     f"{P}_blocks: blocks U8 (3, 64, 3, 16) with scales {P}_scales U8 (3, 64, 2), expected U8 (experts, rows, "
     f"groups, 16) with U8 (experts, rows, groups); {REDOWNLOAD}"),
    (MXFP4, {P + "_blocks": ((3, 64, 3, 16), "U8")},
     f"{P}_blocks: MXFP4 blocks without their scales {P}_scales, expected both in the checkpoint; {REDOWNLOAD}"),
    (MXFP4, {P + "_scales": ((3, 64, 3), "U8")},
     f"{P}_scales: MXFP4 scales without their blocks {P}_blocks, expected both in the checkpoint; {REDOWNLOAD}"),
    (MXFP4, {P + "_blocks": ((3, 64, 3, 16), "U8"), P + "_scales": ((3, 64, 3), "U8"), P: ((3, 96, 64), "BF16")},
     f"{P}: stored both as a tensor and as {P}_blocks, expected one of the two; {REDOWNLOAD}"),
], ids=["scale-grid", "weight-without-scale", "scale-on-bf16-weight", "scale-without-weight",
        "activation-scale-without-fp8-weight", "per-tensor-shape", "block-size", "unknown-method",
        "fp8-without-config", "blocks-scales-shape", "blocks-without-scales", "scales-without-blocks",
        "output-name-taken"])
def test_tensor_map_refusals(config, tensors, message):
    with pytest.raises(QuantizedFormatError) as error:
        quantized_tensor_map(config, tensors)
    assert str(error.value) == message
    assert isinstance(error.value, ValueError) and isinstance(error.value, MergerError)


def test_tensor_map_reads_text_config_metas_fused_experts_and_plain_checkpoints():
    meta = types.SimpleNamespace(shape=(300, 200), dtype="F8_E4M3")
    scale = types.SimpleNamespace(shape=(3, 2), dtype="F32")
    config = {"model_type": "mistral3", "text_config": {"quantization_config": FP8["quantization_config"]}}
    entry = quantized_tensor_map(config, {W: meta, W + "_scale_inv": scale})[W]
    assert (entry.recipe, entry.shape, entry.block_size, entry.sources) == (
        RECIPE_FP8_BLOCK, (300, 200), (128, 128), (W, W + "_scale_inv"))
    # absent weight_block_size means transformers' default, 128 x 128
    assert quantized_tensor_map({"quantization_config": {"quant_method": "fp8"}},
                                {W: meta, W + "_scale_inv": scale})[W].block_size == (128, 128)
    # transformers' fused FP8 experts name their scale after the parameter: P + "_scale_inv"
    experts = {P: ((4, 256, 130), "F8_E4M3"), P + "_scale_inv": ((4, 2, 2), "F32")}
    entry = quantized_tensor_map(FP8, experts)[P]
    assert (entry.recipe, entry.shape, entry.consumed) == (RECIPE_FP8_BLOCK, (4, 256, 130), (P, P + "_scale_inv"))
    plain = quantized_tensor_map({"model_type": "llama"}, {"lm_head.weight": ((64, 32), "BF16")})
    assert plain["lm_head.weight"].recipe == RECIPE_PLAIN and plain["lm_head.weight"].sources == ("lm_head.weight",)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: dequantize_fp8(fp8_weight(4, 4), torch.tensor([[1.0, float("nan")]]), (4, 2), name=W),
     f"{W}: scale holds 1 non-finite values of 2, expected finite numbers; {REDOWNLOAD}"),
    (lambda: dequantize_fp8(fp8_weight(4, 4), torch.tensor([[255, 127]], dtype=torch.uint8), (4, 2), name=W),
     f"{W}: scale holds E8M0 NaN (byte 255), expected powers of two; {REDOWNLOAD}"),
    (lambda: dequantize_fp8(fp8_weight(4, 4), fp8_scale(1, 1), (4, 2), name=W),
     f"{W}: scale grid (1, 1) does not cover rows 0..4 of a weight 4 columns wide in 4x2 blocks (needs (1, 2)); "
     "pass the whole scale and this tensor's weight_block_size"),
    (lambda: dequantize_fp8(fp8_weight(4, 4), fp8_scale(2, 2), (4, 2), name=W),
     f"{W}: scale grid (2, 2) has 2 rows of blocks for a weight of 4 rows in 4-row blocks, expected 1; pass this "
     f"tensor's weight_block_size, or {REDOWNLOAD}"),
    (lambda: dequantize_fp8_rows(fp8_weight(3, 4), fp8_scale(1, 2), (4, 2), 2, name=W),
     f"{W}: scale grid (1, 2) does not cover rows 2..5 of a weight 4 columns wide in 4x2 blocks (needs (2, 2)); "
     "pass the whole scale and this tensor's weight_block_size"),
    (lambda: dequantize_fp8(fp8_weight(4, 4), fp8_scale(1, 2), None, name=W),
     f"{W}: per-tensor scale has shape (1, 2), expected one number (weight_block_size is null); set "
     "quantization_config.weight_block_size in config.json to the checkpoint's blocks"),
    (lambda: dequantize_mxfp4(torch.zeros(1, 2, 1, 16, dtype=torch.uint8),
                              torch.tensor([[[255], [127]]], dtype=torch.uint8), name=P + "_blocks"),
     f"{P}_blocks: 1 scales are E8M0 NaN (byte 255), expected powers of two; {REDOWNLOAD}"),
    (lambda: dequantize_mxfp4(torch.zeros(1, 2, 1, 16, dtype=torch.uint8), torch.zeros(1, 2, dtype=torch.uint8),
                              name=P + "_blocks"),
     f"{P}_blocks: blocks (1, 2, 1, 16) torch.uint8 with scales (1, 2) torch.uint8, expected uint8 (experts, rows, "
     f"groups, 16) with uint8 (experts, rows, groups); {REDOWNLOAD}"),
    (lambda: dequantize_mxfp4_experts(torch.zeros(2, 2, 1, 16, dtype=torch.uint8),
                                      torch.zeros(2, 2, 1, dtype=torch.uint8), 1, 3, name=P + "_blocks"),
     f"{P}_blocks: expert range 1..3 is outside the 2 experts stored; ask for a non-empty range inside them"),
], ids=["fp8-nan-scale", "fp8-e8m0-nan", "fp8-grid-columns", "fp8-grid-rows", "fp8-rows-past-grid",
        "fp8-per-tensor-shape", "mxfp4-nan-scale", "mxfp4-shapes", "mxfp4-expert-range"])
def test_dequantize_refusals(call, message):
    with pytest.raises(QuantizedFormatError) as error:
        call()
    assert str(error.value) == message


# --------------------------------------------------------------------------- NF4 through bitsandbytes


def test_nf4_without_bitsandbytes_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(Nf4UnavailableError) as error:
        nf4_round_trip(torch.ones(4, 4))
    assert isinstance(error.value, ImportError)
    assert str(error.value) == ('an NF4 round trip needs bitsandbytes >= 0.46 (import of bitsandbytes halted; '
                                'None in sys.modules): pip install "merger[nf4]"')


@pytest.mark.parametrize(("version", "message"), [
    ("0.45.5", 'bitsandbytes 0.45.5 has no CPU backend, an NF4 round trip needs >= 0.46: pip install "merger[nf4]"'),
    ("0.50.2", 'bitsandbytes has no NF4 kernel for cpu tensors (Device type not supported for FP4 quantization: '
               'cpu); install one that does: pip install "merger[nf4]"'),
])
def test_nf4_without_a_cpu_backend_names_the_extra(monkeypatch, version, message):
    def quantize_4bit(*args, **kwargs):  # what bitsandbytes 0.45 does with a CPU tensor
        raise NotImplementedError("Device type not supported for FP4 quantization: cpu")

    package = types.ModuleType("bitsandbytes")
    package.__version__ = version
    functional = types.ModuleType("bitsandbytes.functional")
    functional.quantize_4bit = quantize_4bit
    monkeypatch.setitem(sys.modules, "bitsandbytes", package)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", functional)
    with pytest.raises(Nf4UnavailableError) as error:
        nf4_round_trip(torch.ones(4, 4))
    assert str(error.value) == message


def nf4_reference(weight: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """NF4 by its definition: blocks of the flattened tensor, scaled by absmax, nearest of the 16 levels."""
    from bitsandbytes.functional import get_4bit_type

    levels = get_4bit_type("nf4", device="cpu")
    flat = weight.to(torch.float32).reshape(-1)
    padded = torch.nn.functional.pad(flat, (0, -flat.numel() % blocksize)).reshape(-1, blocksize)
    absmax = padded.abs().amax(dim=1, keepdim=True)
    codes = ((padded / absmax).unsqueeze(-1) - levels).abs().argmin(dim=-1)
    return (levels[codes] * absmax).reshape(-1)[:flat.numel()].reshape(weight.shape).to(weight.dtype)


@pytest.mark.parametrize("shape", [(64, 128), (10, 96), (128, 48), (5, 7), (3, 33)])
def test_nf4_round_trip_is_nf4_by_definition(shape):
    pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes not installed (pip install \"merger[nf4]\")")
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    restored = nf4_round_trip(weight, double_quant=False)
    # (10, 96): rows straddle blocks, where bitsandbytes 0.50's CPU kernel fed a 2-D tensor goes wrong
    assert_bits_equal(restored, nf4_reference(weight))
    assert_bits_equal(nf4_round_trip(restored, double_quant=False), restored)  # NF4 values are fixed points


def test_nf4_round_trip_double_quant_keeps_dtype_and_shape():
    pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes not installed (pip install \"merger[nf4]\")")
    weight = torch.randn(48, 80, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    restored = nf4_round_trip(weight)
    assert restored.dtype == torch.bfloat16 and restored.shape == weight.shape
    single = nf4_round_trip(weight, double_quant=False)
    assert_bits_equal(single, nf4_reference(weight))
    # the 8-bit absmax moves each block's scale by well under 1% (dynamic 8-bit code, blocks of 256)
    assert ((restored.float() - single.float()).abs() <= 0.01 * weight.float().abs().max()).all()
    assert not torch.equal(restored, single)
