"""Dequantize quantized base checkpoints, tensor by tensor, exactly as transformers reads them.

Formats (key names and layouts as the checkpoints store them):

- ``fp8`` (DeepSeek-V3, Qwen3-FP8, Ministral 3): ``X.weight`` float8_e4m3fn beside ``X.weight_scale_inv``
  (float32, bf16 or E8M0). With ``weight_block_size: [bh, bw]`` the scale is a grid of shape
  ``(ceil(rows/bh), ceil(cols/bw))`` and the last row/column of blocks may be partial; with
  ``weight_block_size: null`` it is one number (per-tensor). ``X.activation_scale`` (static activation
  scheme) only matters for FP8 matmuls and is dropped. Value = float32(weight) * float32(scale).
- ``mxfp4`` (gpt-oss experts): ``P_blocks`` uint8 ``(E, R, G, 16)`` holds 32 FP4 (E2M1) values per group,
  low nibble first; ``P_scales`` uint8 ``(E, R, G)`` one E8M0 exponent (bias 127) per group. The
  parameter ``P`` is ``(E, G*32, R)``: transformers transposes each expert (``GptOssExperts`` computes
  ``x @ W``).

:func:`quantized_tensor_map` plans from headers (no torch); the ``dequantize_*`` functions compute one
tensor, a row range or an expert range of it, always in float32. transformers multiplies FP8 in float32
before casting, and MXFP4 values are exact in bf16, so ``.to(torch.bfloat16)`` of the result is bit for
bit what transformers loads in bf16.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from merger.errors import MergerError

if TYPE_CHECKING:
    import torch

RECIPE_PLAIN = "plain"
RECIPE_FP8_BLOCK = "fp8-block"
RECIPE_FP8_TENSOR = "fp8-tensor"
RECIPE_MXFP4 = "mxfp4"

FP8_SCALE_SUFFIX = "_scale_inv"  # X.weight -> X.weight_scale_inv; fused experts: X.gate_up_proj_scale_inv
FP8_WEIGHT_TAGS = ("F8_E4M3",)
FP8_SCALE_TAGS = ("F32", "BF16", "F16", "F8_E8M0", "U8")  # U8: E8M0 exponents stored as bytes (MXFP8)
FLOAT8_TAGS = ("F8_E4M3", "F8_E5M2")
FP8_DEFAULT_BLOCK = (128, 128)  # FineGrainedFP8Config's default when weight_block_size is absent
MXFP4_BLOCKS_SUFFIX = "_blocks"
MXFP4_SCALES_SUFFIX = "_scales"
MXFP4_GROUP = 32  # FP4 values sharing one exponent: 16 bytes, two values per byte
E8M0_BIAS = 127
E8M0_NAN = 255  # the one E8M0 code that is not a power of two (OCP MX spec)
# E2M1 code -> value: bit 3 sign, bits 2-1 exponent, bit 0 mantissa (transformers' FP4_VALUES)
FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
NF4_BLOCKSIZE = 64  # bitsandbytes' and PEFT/axolotl's default for 4-bit weights
NF4_MIN_BITSANDBYTES = "0.46"  # the first release with a CPU backend for quantize_4bit
REDOWNLOAD = "the checkpoint is corrupt or incomplete: download it again"


class QuantizedFormatError(MergerError, ValueError):
    """A quantized checkpoint's tensors or quantization_config do not fit together."""


class Nf4UnavailableError(MergerError, ImportError):
    """bitsandbytes (with a CPU backend) is needed for an NF4 round trip and is not installed."""


@dataclass(frozen=True)
class LogicalTensor:
    """One tensor of the dequantized checkpoint and the stored tensors it is made from.

    ``sources`` are the inputs the recipe reads, in order (weight then scale, or blocks then scales);
    ``consumed`` adds companions that are dropped (an FP8 ``activation_scale``). ``block_size`` is
    ``(bh, bw)`` for ``fp8-block`` and None otherwise; ``source_dtype`` is the data tensor's tag.
    """

    name: str
    shape: tuple[int, ...]
    recipe: str
    sources: tuple[str, ...]
    consumed: tuple[str, ...]
    source_dtype: str
    block_size: tuple[int, int] | None = None


def quantized_tensor_map(config: Mapping[str, Any], tensors: Mapping[str, Any]) -> dict[str, LogicalTensor]:
    """Every tensor of the dequantized checkpoint, by output name, in the order of ``tensors``.

    ``config`` is config.json (its ``quantization_config``, or ``text_config``'s); ``tensors`` maps each
    stored key to ``(shape, dtype_tag)`` or to an object with ``.shape`` and ``.dtype`` (a TensorMeta).
    Every stored key is consumed by exactly one entry. Raises QuantizedFormatError for an unknown
    quant_method and for any key that has no partner or whose shape or dtype does not fit it.
    """
    metas = {name: _shape_and_tag(value) for name, value in tensors.items()}
    quant = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    if not quant:
        for name, (_, tag) in metas.items():
            if tag in FLOAT8_TAGS:
                raise QuantizedFormatError(
                    f"{name}: stored as {tag} but config.json has no quantization_config; expected one with "
                    "quant_method 'fp8': restore the checkpoint's config.json")
        entries = {name: _plain(name, meta) for name, meta in metas.items()}
    elif not isinstance(quant, Mapping):
        raise QuantizedFormatError(
            f"config.json: quantization_config is a {type(quant).__name__}, expected an object: fix config.json")
    elif quant.get("quant_method") == "fp8":
        entries = _fp8_entries(metas, _fp8_block_size(quant))
    elif quant.get("quant_method") == "mxfp4":
        entries = _mxfp4_entries(metas)
    else:
        raise QuantizedFormatError(
            f"config.json: quantization_config.quant_method is {quant.get('quant_method')!r}, expected 'fp8' or "
            "'mxfp4' (the formats merger dequantizes): merge into the full-precision model instead")
    _check_consumed_once(metas, entries)
    return entries


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block_size: tuple[int, int] | None,
                   *, name: str = "weight") -> torch.Tensor:
    """The whole float32 tensor ``(..., rows, cols)`` of an FP8 weight and its scale (see the rows variant)."""
    if block_size is not None and weight.ndim >= 2 and scale_inv.ndim == weight.ndim \
            and scale_inv.shape[-2] != math.ceil(weight.shape[-2] / block_size[0]):
        raise QuantizedFormatError(
            f"{name}: scale grid {tuple(scale_inv.shape)} has {scale_inv.shape[-2]} rows of blocks for a weight of "
            f"{weight.shape[-2]} rows in {block_size[0]}-row blocks, expected "
            f"{math.ceil(weight.shape[-2] / block_size[0])}; pass this tensor's weight_block_size, or {REDOWNLOAD}")
    return dequantize_fp8_rows(weight, scale_inv, block_size, 0, name=name)


def dequantize_fp8_rows(weight_rows: torch.Tensor, scale_inv: torch.Tensor, block_size: tuple[int, int] | None,
                        start_row: int, *, name: str = "weight", out: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 rows ``[start_row, start_row + len)`` of an FP8 weight, from only those rows and the full scale.

    ``weight_rows`` is ``(..., n, cols)``; ``scale_inv`` the whole grid ``(..., ceil(rows/bh), ceil(cols/bw))``
    for ``block_size=(bh, bw)``, or one number for ``block_size=None`` (per-tensor). ``start_row`` need not
    be a block boundary. Equal bit for bit to the same rows of :func:`dequantize_fp8`. ``out``: a float32
    tensor of ``weight_rows``' shape to compute into (a streaming reader's reused buffer), returned.
    """
    import torch

    scale = _scale_float32(scale_inv, name)
    if out is not None:
        if out.dtype != torch.float32 or tuple(out.shape) != tuple(weight_rows.shape):
            raise QuantizedFormatError(f"{name}: out is {out.dtype} {tuple(out.shape)}, expected torch.float32 "
                                       f"{tuple(weight_rows.shape)} (the rows' shape); pass a matching buffer")
        weight = out.copy_(weight_rows)
    else:
        weight = weight_rows.to(torch.float32, copy=True)  # multiplied in place below: never the caller's tensor
    if block_size is None:
        if scale.numel() != 1:
            raise QuantizedFormatError(
                f"{name}: per-tensor scale has shape {tuple(scale.shape)}, expected one number (weight_block_size "
                "is null); set quantization_config.weight_block_size in config.json to the checkpoint's blocks")
        return weight.mul_(scale.reshape(()))
    block_rows, block_cols = block_size
    rows, cols = weight.shape[-2:]
    stop = start_row + rows
    needed = (*weight.shape[:-2], math.ceil(stop / block_rows), math.ceil(cols / block_cols))
    if start_row < 0 or scale.ndim != weight.ndim or tuple(scale.shape[:-2]) != needed[:-2] \
            or scale.shape[-1] != needed[-1] or scale.shape[-2] < needed[-2]:
        raise QuantizedFormatError(
            f"{name}: scale grid {tuple(scale.shape)} does not cover rows {start_row}..{stop} of a weight "
            f"{cols} columns wide in {block_rows}x{block_cols} blocks (needs {needed}); pass the whole scale "
            "and this tensor's weight_block_size")
    first, last = start_row // block_rows, (stop - 1) // block_rows
    # one scale row per weight row, then each scale broadcast over its block's columns through a view of
    # the weight: expanding it over columns too would cost a second weight-sized tensor
    row_scale = scale[..., first:last + 1, :].repeat_interleave(block_rows, dim=-2)
    row_scale = row_scale[..., start_row - first * block_rows:, :][..., :rows, :]
    full, partial = divmod(cols, block_cols)
    weight[..., : full * block_cols].unflatten(-1, (full, block_cols)).mul_(row_scale[..., :full, None])
    if partial:
        weight[..., full * block_cols:].mul_(row_scale[..., full:])
    return weight


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, *, name: str = "blocks") -> torch.Tensor:
    """The float32 parameter transformers builds from gpt-oss ``P_blocks`` ``(E, R, G, 16)`` and ``P_scales``.

    Returns ``(E, G*32, R)``, equal bit for bit to ``convert_moe_packed_tensors(blocks, scales,
    dtype=torch.float32)``. Any slice over experts gives the same experts: ``dequantize_mxfp4(b[i:j],
    s[i:j]) == dequantize_mxfp4(b, s)[i:j]``.
    """
    import torch

    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.ndim != 4 or blocks.shape[-1] != 16 \
            or tuple(scales.shape) != tuple(blocks.shape[:-1]):
        raise QuantizedFormatError(
            f"{name}: blocks {tuple(blocks.shape)} {blocks.dtype} with scales {tuple(scales.shape)} {scales.dtype}, "
            f"expected uint8 (experts, rows, groups, 16) with uint8 (experts, rows, groups); {REDOWNLOAD}")
    nan_codes = int((scales == E8M0_NAN).sum())
    if nan_codes:
        raise QuantizedFormatError(
            f"{name}: {nan_codes} scales are E8M0 NaN (byte 255), expected powers of two; {REDOWNLOAD}")
    lut = torch.tensor(FP4_E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    # byte j of a group holds values 2j (low nibble) and 2j+1 (high nibble)
    values = torch.stack((lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]), dim=-1).flatten(-2)
    # ldexp as transformers does (value * 2**exponent): exact, FP4 values have 2 significant bits
    values = torch.ldexp(values, (scales.to(torch.int32) - E8M0_BIAS).unsqueeze(-1))
    experts, rows, groups, _ = blocks.shape
    # stored (out, in) per expert; GptOssExperts computes x @ W, so its parameter is (in, out)
    return values.reshape(experts, rows, groups * MXFP4_GROUP).transpose(1, 2).contiguous()


def dequantize_mxfp4_experts(blocks: torch.Tensor, scales: torch.Tensor, start: int, stop: int,
                             *, name: str = "blocks") -> torch.Tensor:
    """Experts ``[start, stop)`` of :func:`dequantize_mxfp4`, reading only their blocks and scales."""
    if not 0 <= start < stop <= blocks.shape[0]:
        raise QuantizedFormatError(
            f"{name}: expert range {start}..{stop} is outside the {blocks.shape[0]} experts stored; "
            "ask for a non-empty range inside them")
    return dequantize_mxfp4(blocks[start:stop], scales[start:stop], name=name)


def nf4_round_trip(weight: torch.Tensor, *, blocksize: int = NF4_BLOCKSIZE, double_quant: bool = True) -> torch.Tensor:
    """``dequantize_4bit(quantize_4bit(weight))`` with NF4, through bitsandbytes, in ``weight``'s dtype.

    What a QLoRA adapter was trained against: the base as bitsandbytes stores it. ``double_quant``
    (``bnb_4bit_use_double_quant``) also quantizes the per-block absmax; axolotl and the QLoRA recipe
    turn it on, transformers' BitsAndBytesConfig leaves it off. Raises Nf4UnavailableError when
    bitsandbytes (>= 0.46, the first with a CPU backend) is missing.
    """
    import torch

    functional = _bitsandbytes_functional()
    # Blocks run over the flattened tensor, as on CUDA. The CPU kernels differ from CUDA (and between
    # releases) in three ways this sidesteps: 0.50's dequantize_4bit counts blocks per row (wrong when
    # the last dimension is not a multiple of the blocksize), so one flat row; before 0.50 a partial
    # last block fails, so zero padding (zeros change no block's absmax); before 0.49 bf16 products
    # were rounded differently, so float32 in and one rounding to the weight's dtype at the end, as
    # CUDA does (absmax from bf16 values is the same in float32). Not sidestepped: with double_quant,
    # 0.50's CPU 8-bit absmax quantizer takes the farther code at near-ties (2 of 938 absmax values in
    # one test), where 0.46-0.49 take the nearest; the 4-bit codes are the same in every release
    flat = weight.detach().reshape(-1).to(torch.float32)
    padded = torch.nn.functional.pad(flat, (0, -flat.numel() % blocksize))
    try:
        packed, state = functional.quantize_4bit(padded, blocksize=blocksize, quant_type="nf4",
                                                 compress_statistics=double_quant)
        restored = functional.dequantize_4bit(packed, state)
    except NotImplementedError as error:
        raise Nf4UnavailableError(
            f"bitsandbytes has no NF4 kernel for {weight.device.type} tensors ({error}); "
            f'install one that does: pip install "merger[nf4]"') from error
    return restored.reshape(-1)[: flat.numel()].reshape(weight.shape).to(weight.dtype)


def _bitsandbytes_functional() -> Any:
    from packaging.version import InvalidVersion, Version

    try:
        bitsandbytes = importlib.import_module("bitsandbytes")
        functional = importlib.import_module("bitsandbytes.functional")
    except ImportError as error:
        raise Nf4UnavailableError(
            f'an NF4 round trip needs bitsandbytes >= {NF4_MIN_BITSANDBYTES} ({error}): pip install "merger[nf4]"'
        ) from error
    version = str(getattr(bitsandbytes, "__version__", "0"))
    try:
        too_old = Version(version) < Version(NF4_MIN_BITSANDBYTES)
    except InvalidVersion:
        too_old = False  # a development build: let the call itself say whether it works
    if too_old:
        raise Nf4UnavailableError(
            f"bitsandbytes {version} has no CPU backend, an NF4 round trip needs >= {NF4_MIN_BITSANDBYTES}: "
            'pip install "merger[nf4]"')
    return functional


def _shape_and_tag(value: Any) -> tuple[tuple[int, ...], str]:
    shape, tag = (value.shape, value.dtype) if hasattr(value, "shape") else value
    return tuple(int(dim) for dim in shape), str(tag)


def _plain(name: str, meta: tuple[tuple[int, ...], str]) -> LogicalTensor:
    return LogicalTensor(name, meta[0], RECIPE_PLAIN, (name,), (name,), meta[1])


def _fp8_block_size(quant: Mapping[str, Any]) -> tuple[int, int] | None:
    block = quant.get("weight_block_size", FP8_DEFAULT_BLOCK)
    if block is None:
        return None
    if not isinstance(block, (list, tuple)) or len(block) != 2 \
            or not all(isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in block):
        raise QuantizedFormatError(
            f"config.json: quantization_config.weight_block_size is {block!r}, expected two positive integers "
            "[rows, cols] or null (per-tensor scales): fix config.json")
    return int(block[0]), int(block[1])


def _fp8_entries(metas: dict[str, tuple[tuple[int, ...], str]],
                 block_size: tuple[int, int] | None) -> dict[str, LogicalTensor]:
    entries: dict[str, LogicalTensor] = {}
    for name, (shape, tag) in metas.items():
        if name.endswith(FP8_SCALE_SUFFIX) or name.endswith(".activation_scale"):
            continue  # read with their weight; orphans are refused below
        scale = name + FP8_SCALE_SUFFIX
        if scale not in metas:
            if tag in FLOAT8_TAGS:
                raise QuantizedFormatError(
                    f"{name}: {tag} weight without its scale {scale}, expected both in the checkpoint; {REDOWNLOAD}")
            entries[name] = _plain(name, (shape, tag))
            continue
        scale_shape, scale_tag = metas[scale]
        if tag not in FP8_WEIGHT_TAGS or scale_tag not in FP8_SCALE_TAGS or len(shape) < 2:
            raise QuantizedFormatError(
                f"{name}: {tag} {shape} with {scale_tag} scale {scale}, expected an F8_E4M3 matrix with an F32, BF16, "
                "F16 or E8M0 scale (the FP8 layouts merger dequantizes): merge into the full-precision model")
        _check_fp8_scale(name, shape, scale, scale_shape, block_size)
        activation = name.removesuffix("weight") + "activation_scale" if name.endswith(".weight") else None
        consumed = (name, scale) + ((activation,) if activation in metas else ())
        recipe = RECIPE_FP8_TENSOR if block_size is None else RECIPE_FP8_BLOCK
        entries[name] = LogicalTensor(name, shape, recipe, (name, scale), consumed, tag, block_size)
    for name in metas:
        if name.endswith(FP8_SCALE_SUFFIX):
            weight = name.removesuffix(FP8_SCALE_SUFFIX)
        elif name.endswith(".activation_scale"):
            weight = name.removesuffix("activation_scale") + "weight"
        else:
            continue
        if weight not in entries or entries[weight].recipe == RECIPE_PLAIN:
            raise QuantizedFormatError(
                f"{name}: a scale without its FP8 weight {weight}, expected both in the checkpoint; {REDOWNLOAD}")
    return entries


def _check_fp8_scale(name: str, shape: tuple[int, ...], scale: str, scale_shape: tuple[int, ...],
                     block_size: tuple[int, int] | None) -> None:
    if block_size is None:
        if math.prod(scale_shape) != 1 or len(scale_shape) > 2 or len(shape) != 2:
            raise QuantizedFormatError(
                f"{scale}: shape {scale_shape} for weight {name} {shape}, expected one number (weight_block_size "
                "is null: per-tensor scales); set quantization_config.weight_block_size to the checkpoint's blocks")
        return
    rows, cols = shape[-2:]
    expected = (*shape[:-2], math.ceil(rows / block_size[0]), math.ceil(cols / block_size[1]))
    if scale_shape != expected:
        raise QuantizedFormatError(
            f"{scale}: scale grid {scale_shape} for weight {name} {shape}, expected {expected} "
            f"(ceil(rows/{block_size[0]}) x ceil(cols/{block_size[1]})); check quantization_config.weight_block_size "
            f"in config.json, or {REDOWNLOAD}")


def _mxfp4_entries(metas: dict[str, tuple[tuple[int, ...], str]]) -> dict[str, LogicalTensor]:
    entries: dict[str, LogicalTensor] = {}
    for name, (shape, tag) in metas.items():
        if name.endswith(MXFP4_SCALES_SUFFIX):
            blocks = name.removesuffix(MXFP4_SCALES_SUFFIX) + MXFP4_BLOCKS_SUFFIX
            if blocks not in metas:
                raise QuantizedFormatError(f"{name}: MXFP4 scales without their blocks {blocks}, expected both in "
                                           f"the checkpoint; {REDOWNLOAD}")
            continue
        if not name.endswith(MXFP4_BLOCKS_SUFFIX):
            entries[name] = _plain(name, (shape, tag))
            continue
        param = name.removesuffix(MXFP4_BLOCKS_SUFFIX)
        scales = param + MXFP4_SCALES_SUFFIX
        if scales not in metas:
            raise QuantizedFormatError(
                f"{name}: MXFP4 blocks without their scales {scales}, expected both in the checkpoint; {REDOWNLOAD}")
        if param in metas:
            raise QuantizedFormatError(
                f"{param}: stored both as a tensor and as {name}, expected one of the two; {REDOWNLOAD}")
        scale_shape, scale_tag = metas[scales]
        if tag != "U8" or scale_tag != "U8" or len(shape) != 4 or shape[-1] != 16 or scale_shape != shape[:-1]:
            raise QuantizedFormatError(
                f"{name}: blocks {tag} {shape} with scales {scales} {scale_tag} {scale_shape}, expected U8 "
                f"(experts, rows, groups, 16) with U8 (experts, rows, groups); {REDOWNLOAD}")
        experts, rows, groups, _ = shape
        entries[param] = LogicalTensor(param, (experts, groups * MXFP4_GROUP, rows), RECIPE_MXFP4, (name, scales),
                                       (name, scales), tag)
    return entries


def _check_consumed_once(metas: Mapping[str, Any], entries: Mapping[str, LogicalTensor]) -> None:
    """Each stored key feeds exactly one output (the entries' own checks make this hold; it guards them)."""
    seen: dict[str, str] = {}
    for entry in entries.values():
        for key in entry.consumed:
            if key in seen:
                raise QuantizedFormatError(
                    f"{key}: read for both {seen[key]} and {entry.name}, expected one output per stored tensor; "
                    f"{REDOWNLOAD}")
            seen[key] = entry.name
    unused = [key for key in metas if key not in seen]
    if unused:
        raise QuantizedFormatError(f"{unused[0]}: a stored tensor no output reads, expected none; {REDOWNLOAD}")


def _scale_float32(scale_inv: torch.Tensor, name: str) -> torch.Tensor:
    import torch

    if scale_inv.dtype == torch.uint8:
        # E8M0 exponents stored as bytes: the same expression transformers' Fp8Dequantize uses
        if bool((scale_inv == E8M0_NAN).any()):
            raise QuantizedFormatError(f"{name}: scale holds E8M0 NaN (byte 255), expected powers of two; {REDOWNLOAD}")
        return (scale_inv.to(torch.float32) - float(E8M0_BIAS)).exp2()
    scale = scale_inv.to(torch.float32)
    bad = int((~torch.isfinite(scale)).sum())
    if bad:
        raise QuantizedFormatError(
            f"{name}: scale holds {bad} non-finite values of {scale.numel()}, expected finite numbers; {REDOWNLOAD}")
    return scale


def require_nf4() -> None:
    """Raise Nf4UnavailableError now, before anything is written, when an NF4 round trip cannot run."""
    _bitsandbytes_functional()
