"""A quantized base (block-FP8, per-tensor FP8, MXFP4) read as the dequantized model it stands for.

Three readers of one checkpoint, each for one consumer:

- :class:`DequantizedFiles`, the stream engine's base reader (``TensorFiles``' interface): stored bytes
  read with pread into reused buffers (no mmap), dequantized by quantized.py row block by row block
  (expert by expert for stacked tensors), float32.
- :class:`DequantizedLibrary`, validation's reader (``validate.LibraryTensors``' interface): the stored
  tensors read through the safetensors library, a second road to the same values.
- :func:`dequantized_state_dict` / :func:`load_kwargs`, the PEFT engine's and the logits reference's:
  transformers' own dequantization where it computes the format's values, merger's where it does not
  (transformers 5 derives FP8 blocks from the scale grid, which cuts partial edge blocks wrongly).

The values are the format's definition: FP8 ``float32(w) * float32(scale)`` per block, MXFP4 ``FP4 * 2**e``;
cast once to the output dtype they are bit for bit what transformers' ``dequantize=True`` loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import CheckpointError
from ..quantized import (
    RECIPE_MXFP4,
    RECIPE_PLAIN,
    LogicalTensor,
    dequantize_fp8_rows,
    dequantize_mxfp4,
)

if TYPE_CHECKING:
    from ..checkpoint import CheckpointInfo, QuantizedBase

# stored scale tags -> the torch dtype their bytes are read as; E8M0 exponents as bytes (quantized.py
# turns uint8 into 2**(e - 127), the same expression transformers uses)
_SCALE_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F8_E8M0": "uint8", "U8": "uint8"}


def _view(base: CheckpointInfo) -> QuantizedBase:
    view = base.quantized
    if view is None or view.problem:
        raise CheckpointError(f"{base.folder}: not a base merger dequantizes ({view.problem if view else 'not quantized'}); "
                              "read it as stored")
    return view


def _check_range(entry: LogicalTensor, start: int, stop: int) -> None:
    if not 0 <= start <= stop <= entry.shape[0]:
        raise CheckpointError(f"{entry.name}: rows {start}..{stop} asked of a tensor with {entry.shape[0]}, expected a "
                              "range inside it; this is a bug in the caller")


class DequantizedFiles:
    """The logical tensors of a quantized base, for the stream engine: ``rows``, ``torch_dtype``,
    ``read_rows``, ``read``, ``close`` as ``TensorFiles`` has them.

    Plain tensors are read as stored; dequantized ones come as float32 (``torch_dtype``), so the
    engine casts them once, to the output dtype. A tensor's scale grid is read once, with its first
    block (a few KB: one number per 128x128 block). One input file is open at a time.
    """

    def __init__(self, base: CheckpointInfo):
        from .stream import Scratch, TensorFiles

        self.view = _view(base)
        self.stored = TensorFiles(base.folder, self.view.stored)
        self.buffers = Scratch("cpu")
        self.scale: tuple[str, object] | None = None  # (scale key, tensor) of the tensor being read

    def _entry(self, key: str) -> LogicalTensor:
        return self.view.logical[key]

    def torch_dtype(self, key: str):
        import torch

        entry = self._entry(key)
        return self.stored.torch_dtype(key) if entry.recipe == RECIPE_PLAIN else torch.float32

    def rows(self, key: str) -> int:
        entry = self._entry(key)
        return self.stored.rows(key) if entry.recipe == RECIPE_PLAIN else entry.shape[0]

    def read_rows(self, key: str, start: int, stop: int, into) -> None:
        """Rows [start, stop) of ``key`` (experts, for a stacked tensor) into the contiguous CPU tensor ``into``."""
        import torch

        entry = self._entry(key)
        if entry.recipe == RECIPE_PLAIN:
            self.stored.read_rows(key, start, stop, into)
            return
        _check_range(entry, start, stop)
        # computed straight into the caller's buffer when it is float32 (the engine's staging), else through ours
        direct = into.dtype == torch.float32 and into.is_contiguous()
        out = into if direct else self.buffers.take("dequantized", (stop - start,) + entry.shape[1:], torch.float32)
        if entry.recipe == RECIPE_MXFP4:
            out.copy_(self._mxfp4_experts(entry, start, stop))
        else:
            self._fp8_rows(entry, start, stop, out)
        if not direct:
            into.copy_(out)

    def read(self, key: str):
        """The whole tensor in a fresh CPU tensor."""
        import torch

        entry = self._entry(key)
        if entry.recipe == RECIPE_PLAIN:
            return self.stored.read(key)
        out = torch.empty(entry.shape, dtype=torch.float32)
        self.read_rows(key, 0, entry.shape[0], out)
        return out

    def close(self) -> None:
        self.stored.close()
        self.scale = None

    def _fp8_rows(self, entry: LogicalTensor, start: int, stop: int, out) -> None:
        import torch

        weight_key, scale_key = entry.sources
        raw = self.buffers.take("fp8", (stop - start,) + entry.shape[1:], torch.uint8)
        self.stored.read_rows(weight_key, start, stop, raw)
        scale = self._scale_of(scale_key)
        if len(entry.shape) == 2:  # a matrix: rows of blocks, cut anywhere
            dequantize_fp8_rows(raw.view(torch.float8_e4m3fn), scale, entry.block_size, start, name=entry.name, out=out)
        else:  # stacked experts (E, rows, cols): whole experts, each with its own grid
            grid = scale[start:stop] if entry.block_size is not None else scale
            dequantize_fp8_rows(raw.view(torch.float8_e4m3fn), grid, entry.block_size, 0, name=entry.name, out=out)

    def _scale_of(self, key: str):
        """The whole scale tensor (one number per block), read once per weight."""
        import torch

        if self.scale is None or self.scale[0] != key:
            meta = self.view.stored[key]
            tensor = torch.empty(meta.shape, dtype=getattr(torch, _SCALE_DTYPES[meta.dtype]))
            self.stored.read_rows(key, 0, self.stored.rows(key), tensor)
            self.scale = (key, tensor)
        return self.scale[1]

    def _mxfp4_experts(self, entry: LogicalTensor, start: int, stop: int):
        import torch

        blocks_key, scales_key = entry.sources
        blocks_shape = self.view.stored[blocks_key].shape
        blocks = self.buffers.take("blocks", (stop - start,) + tuple(blocks_shape[1:]), torch.uint8)
        scales = self.buffers.take("scales", (stop - start,) + tuple(blocks_shape[1:-1]), torch.uint8)
        self.stored.read_rows(blocks_key, start, stop, blocks)
        self.stored.read_rows(scales_key, start, stop, scales)
        return dequantize_mxfp4(blocks, scales, name=blocks_key)


class DequantizedLibrary:
    """The logical tensors of a quantized base through the safetensors library, for validation:
    ``pieces``, ``slice``, ``read``, ``exact``, ``close`` as ``validate.LibraryTensors`` has them.

    Shares no reading code with :class:`DequantizedFiles` (safe_open's own header parsing and
    dtypes, E8M0 scales as float8_e8m0fnu); the arithmetic is quantized.py's, proven bit for bit
    against transformers. Each read opens the file and lets it go, as LibraryTensors does.
    """

    def __init__(self, base: CheckpointInfo):
        self.folder, self.view = base.folder, _view(base)

    def pieces(self, key: str, indexes: list) -> list:
        """``tensor[index]`` for each index (tuples of ints and slices, the first over rows or experts)."""
        entry = self.view.logical[key]
        if entry.recipe == RECIPE_PLAIN:
            from safetensors import safe_open

            with safe_open(str(self.folder / self.view.stored[key].file), framework="pt") as handle:
                tensor_slice = handle.get_slice(key)
                return [tensor_slice[index] for index in indexes]
        return [self._piece(entry, index) for index in indexes]

    def slice(self, key: str, index, stop: int | None = None):
        """Rows [index, stop) when ``stop`` is given, else ``tensor[index]``."""
        return self.pieces(key, [slice(index, stop) if stop is not None else index])[0]

    def read(self, key: str):
        entry = self.view.logical[key]
        if entry.recipe == RECIPE_PLAIN:
            from safetensors import safe_open

            with safe_open(str(self.folder / self.view.stored[key].file), framework="pt") as handle:
                return handle.get_tensor(key)
        return self._rows(entry, 0, entry.shape[0])

    def exact(self, key: str) -> bool:
        # a copied dequantized tensor is these float32 values cast once: copies compare bit for bit
        return True

    def close(self) -> None:
        pass  # nothing stays open between reads

    def _piece(self, entry: LogicalTensor, index):
        index = index if isinstance(index, tuple) else (index,)
        first, rest = (index[0], index[1:]) if index else (slice(None), ())
        if isinstance(first, int):
            row = first + entry.shape[0] if first < 0 else first
            return self._rows(entry, row, row + 1)[(0,) + rest]
        start, stop, step = first.indices(entry.shape[0])
        if step != 1:
            raise CheckpointError(f"{entry.name}: a stepped slice {first} asked of a dequantized tensor, expected "
                                  "consecutive rows; this is a bug in the caller")
        return self._rows(entry, start, max(start, stop))[(slice(None),) + rest]

    def _stored(self, key: str, start: int | None = None, stop: int | None = None):
        from safetensors import safe_open

        with safe_open(str(self.folder / self.view.stored[key].file), framework="pt") as handle:
            if start is None:
                return handle.get_tensor(key)
            return handle.get_slice(key)[start:stop]

    def _rows(self, entry: LogicalTensor, start: int, stop: int):
        import torch

        _check_range(entry, start, stop)
        if start == stop:
            return torch.empty((0,) + entry.shape[1:], dtype=torch.float32)
        data, scale = entry.sources
        if entry.recipe == RECIPE_MXFP4:
            return dequantize_mxfp4(self._stored(data, start, stop), self._stored(scale, start, stop), name=data)
        grid = self._stored(scale)
        if len(entry.shape) > 2 and entry.block_size is not None:
            grid, first = grid[start:stop], 0  # stacked experts: each expert's own grid
        else:
            first = start
        return dequantize_fp8_rows(self._stored(data, start, stop), grid, entry.block_size, first, name=entry.name)


def dequantized_reference(base: CheckpointInfo) -> DequantizedLibrary | None:
    """Validation's reader of ``base`` when it is a quantized base merger dequantized, else None.

    The hook for validate.py (the base a single adapter's plan starts from, ``open_base``) and
    stage_reference.py (the first stage of a stack): ``dequantized_reference(plan.base) or
    open_independently(plan.base.folder, plan.base.tensors)``.
    """
    if base.quantized is None or base.quantized.problem:
        return None
    return DequantizedLibrary(base)


# --------------------------------------------------------------------------------- the PEFT engine


def load_kwargs(base: CheckpointInfo) -> dict:
    """from_pretrained's arguments that make transformers dequantize ``base`` on load, on CPU:
    ``{"quantization_config": FineGrainedFP8Config(dequantize=True)}`` or Mxfp4Config's; {} when
    transformers' load-time dequantization would not give the format's values (see partial_blocks)."""
    view = _view(base)
    if view.partial_blocks:
        return {}
    if view.method == "mxfp4":
        from transformers import Mxfp4Config

        return {"quantization_config": Mxfp4Config(dequantize=True)}
    from transformers import FineGrainedFP8Config

    # only the loading attribute counts: transformers keeps the checkpoint's own block size and scheme
    return {"quantization_config": FineGrainedFP8Config(dequantize=True)}


def dequantized_state_dict(base: CheckpointInfo, dtype) -> dict:
    """Every logical tensor of ``base`` by its checkpoint name, dequantized by merger and cast to ``dtype``
    (floating tensors; the rest as stored): what the PEFT engine loads when transformers cannot."""
    reader = DequantizedFiles(base)
    try:
        state = {}
        for name in reader.view.logical:
            tensor = reader.read(name)
            state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        return state
    finally:
        reader.close()


def load_dequantized(cls, base: CheckpointInfo, *, dtype, trust_remote_code: bool, config_overrides: dict, **kwargs):
    """``cls`` with ``base``'s dequantized weights, in ``dtype``: through transformers' own dequantization
    where it computes the format's values, else merger's values loaded as a state dict into the model
    config.json describes, its quantization_config removed."""
    from .peft import load_pretrained

    quant = load_kwargs(base)
    if quant:
        return load_pretrained(cls, base.folder, dtype=dtype, trust_remote_code=trust_remote_code,
                               **config_overrides, **quant, **kwargs)
    from transformers import AutoConfig

    from ..inputs import require_confined

    require_confined(base.folder, "model folder")
    config = AutoConfig.from_pretrained(str(base.folder), trust_remote_code=trust_remote_code)
    for level in {id(c): c for c in (config, config.get_text_config())}.values():
        if hasattr(level, "quantization_config"):
            delattr(level, "quantization_config")
    for key, value in config_overrides.items():
        setattr(config, key, value)
    try:
        concrete = _concrete_class(cls, config, base, trust_remote_code)
        model, info = concrete.from_pretrained(None, config=config, state_dict=dequantized_state_dict(base, dtype), dtype=dtype,
                                               trust_remote_code=trust_remote_code, output_loading_info=True, **kwargs)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:
        raise _unbuildable(base, cls, f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}") from None
    # a parameter the state dict did not fill would be left at its random initialisation: refused
    missing = sorted(map(str, info.get("missing_keys") or [])) + sorted(map(str, info.get("mismatched_keys") or []))
    if missing:
        raise _unbuildable(base, cls, f"no weights for {', '.join(missing[:3])}")
    return model


def _unbuildable(base: CheckpointInfo, cls, reason: str) -> CheckpointError:
    return CheckpointError(f"{base.folder}: transformers cannot build {cls.__name__} from its dequantized weights ({reason}); "
                           "check that its weights and config.json belong together (merge-adapter inspect lists shapes)")


def _concrete_class(cls, config, base: CheckpointInfo, trust_remote_code: bool):
    """The model class an auto class picks for ``config`` (from_pretrained without a folder needs one)."""
    if not hasattr(cls, "_model_mapping"):
        return cls
    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and cls.__name__ in auto_map:  # the base's own code, already allowed by the user
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(auto_map[cls.__name__], str(base.folder))
    from transformers.models.auto.auto_factory import _get_model_class

    return _get_model_class(config, cls._model_mapping)
