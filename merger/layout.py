"""The base model's module layout, learned by building it on the meta device (no memory, no weights).

This is where transformers' knowledge enters: which class the config names, which modules are
Linear, GPT-2 Conv1D or Embedding, where the input embedding and output head live, whether they
are tied, and how checkpoint keys map to module names (LLaVA-style checkpoints store
``language_model.model.layers...`` while the model calls it ``model.language_model.layers...``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError, UnsupportedError
from .inputs import require_confined, short

log = logging.getLogger(__name__)

# adapter task_type -> transformers auto class, for when the base config's class does not fit
TASK_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "FEATURE_EXTRACTION": "AutoModel",
}
_TASK_CLASS_HINTS = {
    "SEQ_CLS": "ForSequenceClassification",
    "TOKEN_CLS": "ForTokenClassification",
    "QUESTION_ANS": "ForQuestionAnswering",
}


@dataclass(frozen=True)
class ModuleMeta:
    kind: str  # "linear", "conv1d", "embedding" or "other"
    weight_shape: tuple[int, ...] | None  # as stored in the module (Conv1D: (in, out))
    has_bias: bool = False
    # stacked experts stored (experts, in, out) rather than (experts, out, in) (transformers' is_transposed)
    transposed: bool = False
    # the value its forward multiplies the embedding by (Gemma 3's sqrt(hidden)); None when it has none
    embed_scale: float | None = None


@dataclass(frozen=True)
class ExpertFusion:
    """transformers' rule that stacks per-expert checkpoint tensors into one parameter on load
    (Qwen3-MoE: experts.*.gate_proj + experts.*.up_proj -> experts.gate_up_proj (E, 2·inter, hidden)):
    each source stacked over experts on dim 0, the sources concatenated on ``concat_dim`` (of the
    stacked tensor) when there are several."""

    sources: tuple[str, ...]  # e.g. ("mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight")
    target: str  # e.g. "mlp.experts.gate_up_proj"
    concat_dim: int | None = None

    def match(self, key: str) -> tuple[str, int, int] | None:
        """(parameter, expert, source index) of a checkpoint key this rule stacks, or None."""
        import re

        for index, source in enumerate(self.sources):
            pattern = "(.*?)" + re.escape(source).replace(r"\*", r"(\d+)") + "$"
            found = re.match(pattern, key)
            if found and (not found.group(1) or found.group(1).endswith(".") or source.startswith(".")):
                return found.group(1) + self.target, int(found.group(2)), index
        return None


@dataclass(frozen=True)
class ModelLayout:
    class_name: str
    modules: dict[str, ModuleMeta]
    param_shapes: dict[str, tuple[int, ...]]  # model-namespace parameter names
    embed_module: str | None
    head_module: str | None
    tied: bool  # the head shares the embedding's weight
    to_model_key: dict[str, str]  # checkpoint key -> model parameter name
    key_layout_problem: str | None = None  # set when keys need more than renaming (stream cannot)
    parameters: frozenset = frozenset()  # model-namespace names of trainable parameters (not buffers)
    base_model_prefix: str = ""
    config_overrides: dict[str, Any] = field(default_factory=dict)
    # transformers' renaming rules for this class (regex, replacement), in order: how older
    # checkpoints and adapters named its modules (LLaVA before transformers 4.52: language_model.model.*)
    key_renames: tuple[tuple[str, str], ...] = ()
    expert_fusions: tuple[ExpertFusion, ...] = ()

    def expert_source(self, key: str) -> tuple[str, int, int, ExpertFusion] | None:
        """(parameter, expert, source index, rule) of a per-expert checkpoint key transformers stacks
        (after its renaming rules: Mixtral's checkpoints say block_sparse_moe where the model says mlp)."""
        import re

        if not self.expert_fusions:
            return None
        candidates = [key]
        for pattern, replacement in self.key_renames:
            renamed = re.sub(pattern, replacement, candidates[-1])
            if renamed != candidates[-1]:
                candidates.append(renamed)
        for candidate in candidates:
            for fusion in self.expert_fusions:
                found = fusion.match(candidate)
                if found and found[0] in self.param_shapes:
                    return (*found, fusion)
        return None

    def to_checkpoint_key(self) -> dict[str, str]:
        return {v: k for k, v in self.to_model_key.items()}

    def legacy_module(self, module: str) -> str | None:
        """The module an older name refers to, by transformers' own renaming rules; None when none does."""
        import re

        key = module + ".weight"
        for pattern, replacement in self.key_renames:
            renamed = re.sub(pattern, replacement, key)
            if renamed != key:
                key = renamed
        candidates = [key]
        # rules anchored at a submodule's own names (CLIP's ^vision_model.) apply below that submodule's path
        parts = key.split(".")
        for i in range(1, len(parts) - 1):
            head, tail = ".".join(parts[:i]), ".".join(parts[i:])
            for pattern, replacement in self.key_renames:
                if pattern.startswith("^") and re.match(pattern, tail):
                    candidates.append(f"{head}.{re.sub(pattern, replacement, tail)}")
        if self.base_model_prefix:
            candidates += [f"{self.base_model_prefix}.{key}", key.removeprefix(self.base_model_prefix + ".")]
        for candidate in candidates:
            name = candidate[: -len(".weight")]
            if candidate != module + ".weight" and name in self.modules:
                return name
        return None


def choose_model_class(config: dict[str, Any], task_type: str | None, extra_head_rows: int | None,
                       trust_remote_code: bool = False):
    """The transformers class to build: the config's architecture, unless the adapter's task needs another head."""
    import transformers

    arch = (config.get("architectures") or [None])[0]
    if trust_remote_code and config.get("auto_map"):
        auto_name = TASK_AUTO_CLASSES.get(str(task_type or "").upper(), "AutoModelForCausalLM")
        return getattr(transformers, auto_name), {}
    hint = _TASK_CLASS_HINTS.get(str(task_type or "").upper())
    if arch and hasattr(transformers, arch) and (hint is None or arch.endswith(hint)):
        return getattr(transformers, arch), {}
    auto_name = TASK_AUTO_CLASSES.get(str(task_type or "").upper(), "AutoModelForCausalLM")
    overrides = {"num_labels": extra_head_rows} if hint and extra_head_rows else {}
    return getattr(transformers, auto_name), overrides


def meta_model(cls, hf_config, trust_remote_code: bool = False):
    """``cls`` built from ``hf_config`` on the meta device: every module and shape, no memory."""
    import torch

    with torch.device("meta"):
        if cls.__name__.startswith("Auto"):
            return cls.from_config(hf_config, trust_remote_code=trust_remote_code)
        return cls._from_config(hf_config)


def build_layout(folder: Path, config: dict[str, Any], checkpoint_keys, task_type: str | None = None,
                 extra_head_rows: int | None = None, trust_remote_code: bool = False) -> ModelLayout:
    """Build the model on the meta device and describe its modules and key mapping."""
    import torch
    from transformers import AutoConfig

    auto_map = config.get("auto_map") or {}
    if auto_map and not trust_remote_code:
        code = auto_map.get("AutoModelForCausalLM") or next(iter(auto_map.values()), "")
        raise UnsupportedError(
            f"{folder / 'config.json'}: the base runs its own code ({code}); pass --trust-remote-code "
            "to let transformers run it, if you trust that code"
        )
    missing_code = _missing_code_files(folder, auto_map) if trust_remote_code else []
    if missing_code:
        raise CheckpointError(
            f"{folder / 'config.json'}: its auto_map names {', '.join(missing_code)}, which the folder does not have; "
            "download the model's code files with its weights"
        )
    if trust_remote_code:  # the code transformers will import must be the folder's own
        require_confined(folder, "base model folder")
    try:
        # trust_remote_code is always explicit: left unset, transformers asks on stdin and hangs a pipeline
        hf_config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises ValueError/KeyError/OSError/TypeError for configs it cannot read
        from transformers import CONFIG_MAPPING

        if config.get("model_type") in CONFIG_MAPPING:
            raise CheckpointError(f"{folder / 'config.json'}: transformers cannot read it ({type(exc).__name__}: "
                                  f"{short(str(exc).splitlines()[0] if str(exc) else '', 160)}); a field has a value "
                                  "transformers does not write: fix or re-download it") from None
        raise CheckpointError(
            f"{folder / 'config.json'}: transformers does not know model_type {short(config.get('model_type'))} "
            f"(architectures {short(config.get('architectures'))}): upgrade transformers, or merge with the tools of "
            "the project that defines it"
        ) from None
    cls, overrides = choose_model_class(config, task_type, extra_head_rows, trust_remote_code)
    for key, value in overrides.items():
        setattr(hf_config, key, value)
    try:
        model = meta_model(cls, hf_config, trust_remote_code)
    except Exception as exc:
        raise CheckpointError(f"{folder}: cannot build {cls.__name__} from its config ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None

    modules: dict[str, ModuleMeta] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
        bias = isinstance(getattr(module, "bias", None), torch.Tensor)
        if isinstance(module, torch.nn.Embedding):
            kind = "embedding"
        elif isinstance(module, torch.nn.Linear):
            kind = "linear"
        elif type(module).__name__ == "Conv1D":
            kind = "conv1d"
        else:
            kind = "other"
        modules[name] = ModuleMeta(kind, shape, bias, bool(getattr(module, "is_transposed", False)),
                                   _embed_scale(module) if kind == "embedding" else None)

    names = {id(m): n for n, m in model.named_modules()}
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed_name = names.get(id(embed)) if embed is not None else None
    head_name = names.get(id(head)) if head is not None else None
    tied = bool(head is not None and embed is not None and head.weight is embed.weight)

    state = dict(model.state_dict(keep_vars=True))
    param_shapes = {k: tuple(v.shape) for k, v in state.items()}
    fusions = _expert_fusions(model)
    to_model, problem = _map_checkpoint_keys(model, list(checkpoint_keys), state, fusions)
    return ModelLayout(type(model).__name__, modules, param_shapes, embed_name, head_name, tied, to_model,
                       key_layout_problem=problem, base_model_prefix=getattr(model, "base_model_prefix", "") or "",
                       config_overrides=overrides, key_renames=_key_renames(model), expert_fusions=fusions,
                       parameters=frozenset(name for name, _ in model.named_parameters(remove_duplicate=False)))


def _missing_code_files(folder: Path, auto_map: dict) -> list[str]:
    """Local code files an auto_map refers to ('modeling_x.Class'; 'repo--modeling_x.Class' lives elsewhere)."""
    names = []
    for value in auto_map.values():
        for ref in value if isinstance(value, list) else [value]:
            if isinstance(ref, str) and "--" not in ref and "." in ref:
                names.append(ref.rsplit(".", 1)[0] + ".py")
    return sorted({n for n in names if not (folder / n).is_file()})


def _embed_scale(module) -> float | None:
    """The factor a scaled embedding (Gemma3TextScaledWordEmbedding) applies in its forward.

    On the meta device its buffer holds no value; its classes compute it as sqrt(embedding_dim)
    (checked against the class's own value in the tests), so a meta buffer is read as that.
    """
    import torch

    scale = getattr(module, "embed_scale", None)
    if scale is None:
        return None
    if isinstance(scale, (int, float)):
        return float(scale)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        if scale.device.type != "meta":
            return float(scale)
        return float(torch.tensor(float(module.embedding_dim) ** 0.5))  # a float32 buffer, as the classes hold it
    return None


def _key_renames(model) -> tuple[tuple[str, str], ...]:
    """transformers' renaming rules for ``model`` as (regex, replacement) pairs; () when it has none."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        renames = []
        for rule in get_model_conversion_mapping(model):
            if isinstance(rule, WeightRenaming):
                targets = list(rule.target_patterns)
                for i, source in enumerate(rule.source_patterns):
                    renames.append((source, targets[min(i, len(targets) - 1)]))
        return tuple(renames)
    except Exception as exc:  # an older or newer transformers
        log.debug("no renaming rules (%s)", exc)
        return ()


def _expert_fusions(model) -> tuple[ExpertFusion, ...]:
    """transformers' rules for this class that stack per-expert tensors (and nothing else)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        fusions = []
        for rule in get_model_conversion_mapping(model):
            if isinstance(rule, WeightRenaming):
                continue
            ops = [(type(op).__name__, getattr(op, "dim", None)) for op in rule.operations]
            targets = list(rule.target_patterns)
            if len(targets) != 1 or not ops or ops[0] != ("MergeModulelist", 0) or len(ops) > 2:
                continue
            if len(ops) == 2 and ops[1][0] != "Concatenate":
                continue
            fusions.append(ExpertFusion(tuple(rule.source_patterns), targets[0], ops[1][1] if len(ops) == 2 else None))
        return tuple(fusions)
    except Exception as exc:  # an older or newer transformers
        log.debug("no expert fusion rules (%s)", exc)
        return ()


def _map_checkpoint_keys(model, checkpoint_keys: list[str], state: dict,
                         fusions: tuple[ExpertFusion, ...] = ()) -> tuple[dict[str, str], str | None]:
    """checkpoint key -> model key using transformers' own renaming rules for this model."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    except Exception as exc:  # an older or newer transformers: fall back to identity
        log.debug("no conversion mapping (%s); assuming checkpoint keys are module names", exc)
        renamings, converters, rename_source_key = [], [], None

    prefix = getattr(model, "base_model_prefix", "") or ""
    mapping: dict[str, str] = {}
    problem = None
    for key in checkpoint_keys:
        if rename_source_key is not None:
            new_key, converted = rename_source_key(key, renamings, converters, prefix or None, state)
            if converted is not None and not any(f.match(key) for f in fusions):
                problem = f"checkpoint key {key} is converted (not just renamed) when transformers loads it"
        else:
            new_key = key
        if new_key not in state and prefix:
            if f"{prefix}.{new_key}" in state:
                new_key = f"{prefix}.{new_key}"
            elif new_key.startswith(prefix + ".") and new_key[len(prefix) + 1:] in state:
                new_key = new_key[len(prefix) + 1:]
        mapping[key] = new_key
    return mapping, problem
