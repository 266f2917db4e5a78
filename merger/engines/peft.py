"""The PEFT engine: transformers loads the base, PEFT loads the adapter, merge_and_unload merges.

It needs the whole model in memory (or spread by an accelerate device map over GPUs, CPU and
disk), and it runs any architecture transformers and PEFT can load, custom layers included.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import CheckpointError, IncompatibleError, UnsupportedError
from ..inputs import require_confined
from ..keys import PEFT_PREFIX
from ..lora import grow_rows
from ..options import parse_max_memory, parse_size
from ..plan import MergePlan

log = logging.getLogger(__name__)


def device_map_kwargs(plan: MergePlan, cls, load_dtype) -> dict:
    """from_pretrained's placement arguments for the chosen --device-map.

    ``auto`` spreads the model over the GPUs (then the CPU) when there are any; with --max-memory
    it also places it without a GPU, so the limits are never silently ignored.
    """
    import torch

    options = plan.options
    choice = options.device_map
    if choice == "cpu" or (choice == "auto" and not options.max_memory and not torch.cuda.is_available()):
        return {}
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise UnsupportedError(f"--device-map {choice}: no CUDA GPU is visible to torch; use --device-map cpu")
    if choice != "auto":
        return {"device_map": {"": choice}}
    from .placement import auto_device_map

    device_map = auto_device_map(_meta_model(plan, cls), parse_max_memory(options.max_memory), load_dtype)
    log.debug("device map: %s", dict(device_map))
    return {"device_map": device_map}


def _spans_devices(placement: dict) -> bool:
    device_map = placement.get("device_map")
    return isinstance(device_map, dict) and len(set(device_map.values())) > 1


def _meta_model(plan: MergePlan, cls):
    """The base model with no weights, for placement arithmetic."""
    from transformers import AutoConfig

    from ..layout import meta_model

    config = AutoConfig.from_pretrained(str(plan.base.folder), trust_remote_code=plan.options.trust_remote_code)
    for key, value in plan.layout.config_overrides.items():
        setattr(config, key, value)
    return meta_model(cls, config, plan.options.trust_remote_code)


def model_class(plan: MergePlan):
    """The transformers class the plan was made for; for a custom-code base, the auto class that finds its code."""
    import transformers

    cls = getattr(transformers, plan.layout.class_name, None)
    if cls is None:
        from ..layout import TASK_AUTO_CLASSES

        cls = getattr(transformers, TASK_AUTO_CLASSES.get(str(plan.adapter.task_type or "").upper(), "AutoModelForCausalLM"))
    return cls


def load_base(plan: MergePlan):
    import torch

    cls = model_class(plan)
    load_dtype = getattr(torch, plan.base.dtype if plan.base.dtype in ("float32", "bfloat16", "float16") else "float32")
    placement = device_map_kwargs(plan, cls, load_dtype)
    if _spans_devices(placement):
        # accelerate cannot cast a model it dispatched over several devices: load in the output
        # dtype instead (the merge then runs in it, as PEFT's would)
        load_dtype = getattr(torch, plan.dtype)
    if plan.base.quantized is not None:  # block-FP8 / MXFP4: the dequantized model (bfloat16, plan.base.dtype)
        from .dequant_source import load_dequantized

        model = load_dequantized(cls, plan.base, dtype=load_dtype, trust_remote_code=plan.options.trust_remote_code,
                                 config_overrides=plan.layout.config_overrides, **placement)
    else:
        model = load_pretrained(cls, plan.base.folder, dtype=load_dtype, trust_remote_code=plan.options.trust_remote_code,
                                **plan.layout.config_overrides, **placement)
    model.eval()
    return model


def load_pretrained(cls, folder: Path, *, trust_remote_code: bool, **kwargs):
    """``cls.from_pretrained(folder)``, its failures as one line naming the folder (transformers
    raises RuntimeError with a multi-line report, or "look at the above report!" after a log
    line the CLI does not show)."""
    # transformers picks the files itself (a single file over an index, a generation config):
    # none of them may lead out of the folder
    require_confined(Path(folder), "model folder")
    try:
        return cls.from_pretrained(str(folder), trust_remote_code=trust_remote_code, **kwargs)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:
        text = str(exc)
        if "mismatch" in text or "ignore_mismatched_sizes" in text:
            reason = "a tensor's shape differs from what its config.json describes"
        else:
            reason = f"{type(exc).__name__}: {(text.strip().splitlines() or [''])[0][:200]}"
        raise CheckpointError(f"{folder}: transformers cannot load it as {cls.__name__} ({reason}); "
                              "check that its weights and config.json belong together (merge-adapter inspect lists shapes)") from None


def _set_tie(model, tie: bool) -> None:
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = tie


def resize_like_plan(model, plan: MergePlan, as_trained: bool = False) -> None:
    """Give embedding and head exactly the planned rows (grown rows by the plan's rule).

    ``as_trained``: the rows the adapter was trained with instead, for the unmerged reference
    model; they differ only where the plan restores design rows transformers' resize dropped.
    """
    import torch

    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if plan.embed is None or not plan.embed.changed and (plan.head is None or not plan.head.changed):
        return
    rows = plan.embed.rows
    if plan.embed_extra_rows:
        if not (as_trained and plan.embed_design_pad):
            raise UnsupportedError(f"--engine peft: transformers' resize_token_embeddings gives {plan.layout.class_name}'s head "
                                   f"the embedding's rows, but its embedding has {plan.embed_extra_rows} more by design; "
                                   "use --engine stream, which sizes each matrix on its own")
        rows -= plan.embed_design_pad  # what transformers' resize made of the model the adapter was trained on
    old_embed = embed.weight.detach().clone()
    old_head = head.weight.detach().clone() if head is not None and head.weight is not embed.weight else None
    old_bias = head.bias.detach().clone() if head is not None and getattr(head, "bias", None) is not None else None
    model.resize_token_embeddings(rows, mean_resizing=False)
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    with torch.no_grad():
        embed.weight.copy_(grow_rows(old_embed, rows, plan.options.new_rows))
        if old_head is not None:
            head.weight.copy_(grow_rows(old_head, plan.head.rows, plan.options.new_rows))
        if old_bias is not None:  # one logit bias per row: grown by the same rule as the rows
            head.bias.copy_(grow_rows(old_bias, plan.head.rows, plan.options.new_rows))


def untie_head(peft_model, plan: MergePlan) -> None:
    """Give the head its own copy of the shared matrix before merging, when the plan unties.

    After the adapter is loaded, not before: PEFT loads a saved base layer into the shared
    parameter, so the head of the unmerged model sees it too. Before merging: merging writes the
    embedding's updates in place, and a shared head would silently take them.
    """
    import torch

    if not (plan.layout.tied and not plan.tie_word_embeddings):
        return
    model = peft_model.get_base_model()
    _set_tie(model, False)
    head = model.get_output_embeddings()
    target = getattr(head, "base_layer", None) or getattr(head, "original_module", None) or head
    target.weight = torch.nn.Parameter(target.weight.detach().clone(), requires_grad=False)


def attach_adapter(model, plan: MergePlan):
    """Load the adapter and prove every tensor in its file landed in the model."""
    from peft import PeftConfig, PeftModel
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    folder = str(plan.adapter.folder)
    config = PeftConfig.from_pretrained(folder)
    config.inference_mode = True
    if isinstance(getattr(config, "init_lora_weights", None), str):
        # the weights are loaded next: a PiSSA/OLoRA/CorDA init would first rewrite the base again (an
        # unconverted adapter is refused or its base is the rewritten one, --residual-base), or need data
        config.init_lora_weights = True
    weights = load_peft_weights(folder, device="cpu")
    if plan.module_renames:  # saved with older transformers' module names: PEFT finds them under today's
        weights = renamed_weights(weights, dict(plan.module_renames))
        config.target_modules = sorted({k[len(PEFT_PREFIX):].split(".lora_")[0] for k in weights if ".lora_A" in k or ".lora_embedding_A" in k})
    peft_model = PeftModel(model, config)
    result = set_peft_model_state_dict(peft_model, weights)
    # copies the plan already accounted for (save_embedding_layers' duplicates, original modules,
    # a tied head's copies of the embedding's tensors) are expected to find no slot of their own
    accounted = {k for k, use in plan.adapter_usage.items() if use == "evidence" or use.startswith(("duplicate of", "tied:"))}
    accounted |= {use.removeprefix("duplicate of ") for use in plan.adapter_usage.values() if use.startswith("duplicate of")}
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if ("default" in k or k in weights) and k not in accounted]
    from ..peft_types import tuner_prefix

    trained = ("lora_", "trainable_tokens", "modules_to_save") + ((tuner_prefix(plan.adapter.peft_type),) if tuner_prefix(plan.adapter.peft_type) else ())
    missing = [k for k in getattr(result, "missing_keys", []) if ".default" in k and any(t in k for t in trained)]
    if missing:  # a tied head's token adapter shares the embedding's values: not missing at all
        state = peft_model.state_dict(keep_vars=True)
        loaded = {id(state[k]) for k in state if k not in set(missing)}
        missing = [k for k in missing if id(state.get(k)) not in loaded]
    if unexpected or missing:
        raise IncompatibleError(
            f"PEFT could not place every adapter tensor: unexpected {unexpected[:4]}, missing {missing[:4]}; "
            "the adapter does not match this base"
        )
    if plan.embedding_drift is not None:
        emulate_unscaled_embedding(peft_model)
    return peft_model.eval()  # new LoRA layers start in training mode: dropout would randomise the reference


def emulate_unscaled_embedding(peft_model) -> None:
    """PEFT before 0.18 as it trained (drift.ScaledEmbeddingDrift): its layers did not know a scaled
    embedding's factor, which today's PEFT reads through ``_get_embed_scale``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in peft_model.modules():
        if isinstance(module, BaseTunerLayer):
            module._get_embed_scale = lambda: None


def renamed_weights(weights: dict, renames: dict[str, str]) -> dict:
    """Adapter tensors with their modules' older names replaced by the model's."""
    from ..keys import parse_adapter_key

    out = {}
    for key, value in weights.items():
        parsed = parse_adapter_key(key)
        if parsed and parsed.module in renames and key.startswith(PEFT_PREFIX + parsed.module):
            key = PEFT_PREFIX + renames[parsed.module] + key[len(PEFT_PREFIX + parsed.module):]
        out[key] = value
    return out


def with_merge_base(model, plan: MergePlan, stats: dict | None = None):
    """``model`` with --merge-base applied: for nf4, every Linear weight but the head replaced by its
    NF4 round trip, as the 4-bit base of a QLoRA run held it."""
    import torch

    if plan.options.merge_base != "nf4":
        return model
    from ..quantized import nf4_round_trip

    head = model.get_output_embeddings()
    worst, count = 0.0, 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module is not head:
                restored = nf4_round_trip(module.weight)
                worst = max(worst, float((restored.float() - module.weight.float()).norm() / max(float(module.weight.float().norm()), 1e-12)))
                module.weight.copy_(restored)
                count += 1
    if stats is not None:
        stats.update(merge_base_modules=count, merge_base_max_rel_difference=worst)
    return model


def merge_stages(model, stages: list[MergePlan]):
    """``model`` with each stage's adapter loaded and merged in turn, as the pipeline did between stages."""
    for stage in stages:
        resize_like_plan(model, stage)
        peft_model = attach_adapter(model, stage)
        untie_head(peft_model, stage)
        model = peft_model.merge_and_unload(progressbar=False)
        _set_tie(model, stage.tie_word_embeddings)
        if stage.tie_word_embeddings:
            model.tie_weights()
    return model


def reference_model(plan: MergePlan):
    """The trained model as PEFT runs it: the earlier stages merged, the last adapter loaded unmerged
    on the rows it was trained with (validation's reference)."""
    import torch

    model = merge_stages(with_merge_base(load_base(plan.first), plan), plan.stages[:-1])
    resize_like_plan(model, plan, as_trained=True)
    if plan.dtype != plan.first.base.dtype:
        model.to(getattr(torch, plan.dtype))
    return attach_adapter(model, plan)


def execute_peft(plan: MergePlan, out_dir: Path, progress=None, stats: dict | None = None) -> list[str]:
    import torch

    merged = merge_stages(with_merge_base(load_base(plan.first), plan, stats), plan.stages)
    if next(merged.parameters()).dtype != getattr(torch, plan.dtype):
        merged.to(getattr(torch, plan.dtype))
    merged.config.vocab_size = plan.embed.rows if plan.embed else merged.config.vocab_size
    merged.save_pretrained(str(out_dir), max_shard_size=parse_size(plan.options.max_shard_size), safe_serialization=True)
    if progress:
        progress(len(plan.ops))
    return sorted(p.name for p in out_dir.glob("*.safetensors"))
