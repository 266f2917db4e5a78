"""Planning step 1: which model module each adapter tensor belongs to, and in which role.

Pure: adapter facts and the model layout in, a grouping out. Tensors that name nothing in the
base, second copies of one module's weight and LoRA on raw parameters are sorted here, so the
later steps see one tensor per (module, role).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from .adapter import AdapterInfo
from .keys import module_leaf
from .layout import ModelLayout
from .plan_rules import prefer, trained_on

CLASSIFIER_HEADS = ("score", "classifier")  # task heads an adapter may bring whole


@dataclass
class AdapterGroups:
    """The adapter's tensors by model module: ``by_module[module][role] = adapter key``."""

    by_module: dict[str, dict[str, str]] = field(default_factory=lambda: defaultdict(dict))
    usage: dict[str, str] = field(default_factory=dict)  # adapter key -> where it went (filled by later steps too)
    parameter_lora: set[str] = field(default_factory=set)  # modules whose raw parameters carry LoRA
    peft_merged: set[str] = field(default_factory=set)  # modules adapted by another PEFT type (LoHa, IA3, ...)
    problems: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)  # adapter module name -> model module (older transformers names)
    parameter_owner: dict[str, str] = field(default_factory=dict)  # adapter key -> module whose raw parameter it adapts
    # per-expert Linear modules of the checkpoint that transformers stacks on load (experts.3.gate_proj):
    # LoRA saved on them (older PEFT/transformers) is merged into those checkpoint tensors
    checkpoint_modules: set[str] = field(default_factory=set)

    def roles(self, module: str | None) -> dict[str, str]:
        return self.by_module.get(module, {}) if module else {}


def resolve_module(layout: ModelLayout, module: str) -> str | None:
    """The model-namespace module an adapter key names (LLaVA-style renames included)."""
    if module in layout.modules:
        return module
    mapped = layout.to_model_key.get(module + ".weight")
    if mapped and mapped.endswith(".weight"):
        return mapped[: -len(".weight")]
    return layout.legacy_module(module)


def group_adapter_tensors(adapter: AdapterInfo, layout: ModelLayout) -> AdapterGroups:
    groups = AdapterGroups()
    absent: list[str] = []
    for key in adapter.keys:
        if key.module and key.module not in layout.modules:
            now = resolve_module(layout, key.module)
            if now and not layout.expert_source(key.module + ".weight"):
                groups.renamed[key.module] = now
        if key.role == "shared":  # one tensor every module of the type uses (VeRA's projections)
            groups.usage[key.key] = f"shared by every {adapter.peft_type} module (merged by PEFT)"
            continue
        if key.role == "tuner":
            module = resolve_module(layout, key.module)
            if module is None:
                absent.append(key.module)
                groups.usage[key.key] = "absent"
                continue
            groups.usage[key.key] = f"{adapter.peft_type} on {module} (merged by PEFT)"
            groups.peft_merged.add(module)
            continue
        owner = parameter_lora_owner(key, layout, adapter.config)
        if owner is not None:
            groups.usage[key.key] = f"parameter LoRA on {owner} (merged by PEFT)"
            groups.parameter_lora.add(owner)
            groups.parameter_owner[key.key] = owner
            continue
        module = resolve_module(layout, key.module)
        if module is None and layout.expert_source(key.module + ".weight"):
            module = key.module
            groups.checkpoint_modules.add(module)
        if module is None and key.role in ("full_weight", "full_bias") and module_leaf(key.module) in CLASSIFIER_HEADS:
            module = key.module  # a new task head (a classifier's 'score') the base lacks
        if module is None:
            absent.append(key.module)
            groups.usage[key.key] = "absent"  # reported once below, not again as unused
            continue
        roles = groups.by_module[module]
        if key.role in roles:  # e.g. save_embedding_layers also writes X.weight beside X.modules_to_save.weight
            keep, spare = prefer(roles[key.role], key.key)
            if adapter.tensors[keep].shape != adapter.tensors[spare].shape:
                groups.problems.append(f"{spare}: a second copy of {keep} with another shape ({list(adapter.tensors[spare].shape)} "
                                       f"vs {list(adapter.tensors[keep].shape)}); the adapter file is inconsistent")
            roles[key.role] = keep
            groups.usage[spare] = f"duplicate of {keep}"
        else:
            roles[key.role] = key.key
    if absent:
        modules = sorted(set(absent))
        groups.problems.append(
            f"{len(modules)} modules the adapter targets do not exist in the base {layout.class_name} "
            f"({', '.join(modules[:3])}{' ...' if len(modules) > 3 else ''}); {trained_on(adapter)}"
        )
    return groups


def parameter_lora_owner(key, layout: ModelLayout, config: dict) -> str | None:
    """The module whose raw parameter an adapter tensor adapts (PEFT's target_parameters), or None.

    PEFT wraps such a module once per targeted parameter, nesting the wrappers, so the keys read
    ``experts.lora_A.weight`` and ``experts.base_layer.lora_A.weight``.
    """
    if not config.get("target_parameters") or key.role not in ("lora_A", "lora_B"):
        return None
    module = key.module
    while module.endswith(".base_layer"):
        module = module[: -len(".base_layer")]
    resolved = resolve_module(layout, module)
    meta = layout.modules.get(resolved) if resolved else None
    if meta is None or meta.kind != "other":
        return None  # a LoRA pair on an ordinary layer
    return resolved


def token_indices(config: dict, module: str) -> tuple[int, ...] | None:
    """The token ids whose rows an adapter's trainable-token values are for (PEFT's config fields)."""
    if str(config.get("peft_type")).upper() == "TRAINABLE_TOKENS":
        return tuple(config.get("token_indices") or ())
    spec = config.get("trainable_token_indices")
    if isinstance(spec, list):
        return tuple(spec)
    if isinstance(spec, dict):
        for name, indices in spec.items():
            if module == name or module.endswith("." + name):
                return tuple(indices)
        # PEFT also writes tied-head deltas under the head's name
        return tuple(next(iter(spec.values()))) if len(spec) == 1 else None
    return None
