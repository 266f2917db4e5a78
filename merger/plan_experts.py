"""Planning step for mixture-of-experts LoRA: which checkpoint tensor gets which expert's update.

Two adapter layouts meet two checkpoint layouts. PEFT >= 0.17 trains LoRA on transformers 5's
stacked expert parameters (``target_parameters``: one pair for ``experts.gate_up_proj`` (E, d1, d2)),
older PEFT on per-expert Linear modules (``experts.3.gate_proj``). Checkpoints store the experts
stacked (gpt-oss) or per expert (Qwen3-MoE and Mixtral, as transformers 5 still saves them), and
transformers stacks the latter on load by rules it publishes (layout.ExpertFusion). This step maps
each stacked pair onto every checkpoint tensor it reaches, slice by slice, and fails when any
expert is left without its update. Pure: no torch, no disk.
"""

from __future__ import annotations

from dataclasses import dataclass

from .adapter import AdapterInfo
from .checkpoint import CheckpointInfo
from .layout import ModelLayout
from .lora import lora_scale, pattern_value


@dataclass(frozen=True)
class ExpertPair:
    a_key: str
    b_key: str
    experts: int
    parameter: str  # the model parameter, e.g. model.layers.0.mlp.experts.gate_up_proj


@dataclass(frozen=True)
class ExpertDelta:
    """A stacked-expert LoRA pair's update on one checkpoint tensor.

    PEFT stores A as (E·r, a) expert-major and B as (b, r·E) rank-major; expert e's update in the
    parameter's own (d1, d2) is ``scale · B_e @ A_e`` (``b_first``) or its transpose.
    """

    a_key: str
    b_key: str
    scale: float
    experts: int
    expert: int | None  # None: the checkpoint tensor is the whole stack (E, d1, d2)
    b_first: bool
    row_offset: int = 0  # first row of this tensor within the expert's (d1, d2) matrix (stacked sources)


def expert_pairs(adapter: AdapterInfo, layout: ModelLayout, owners: dict[str, str]) -> list[ExpertPair]:
    """The adapter's LoRA pairs on 3-D expert parameters, each with the parameter it adapts.

    PEFT wraps a module once per targeted parameter, nesting the wrappers, so a module's pairs
    differ by their count of ``base_layer``. Which parameter each belongs to is read from the
    shapes (a pair fits exactly one of the module's parameters, in either orientation); only when
    several fit does the nesting decide: PEFT wraps in sorted order of target_parameters, the
    outermost (no ``base_layer``) being the first (adapter_config.json's list order is not kept).
    ``owners`` maps adapter keys to the module owning the parameter (plan_groups.parameter_lora_owner).
    """
    targets = sorted(set(adapter.config.get("target_parameters") or []))
    by_pair: dict[tuple[str, int], dict[str, str]] = {}
    for key in adapter.keys:
        module = owners.get(key.key)
        if module is None:
            continue
        by_pair.setdefault((module, key.module.count(".base_layer")), {})[key.role] = key.key
    pairs = []
    for (module, depth), roles in sorted(by_pair.items()):
        if "lora_A" not in roles or "lora_B" not in roles:
            continue
        params = []
        for target in targets:
            owner, _, leaf = target.rpartition(".")
            name = f"{module}.{leaf}"
            if name in layout.param_shapes and (not owner or module == owner or module.endswith("." + owner)) and name not in params:
                params.append(name)
        params = [p for p in params if len(layout.param_shapes[p]) == 3]
        a_cols, b_rows = adapter.tensors[roles["lora_A"]].shape[1], adapter.tensors[roles["lora_B"]].shape[0]
        fitting = [p for p in params if {a_cols, b_rows} == set(layout.param_shapes[p][1:]) or
                   (a_cols == b_rows == layout.param_shapes[p][1] == layout.param_shapes[p][2])]
        if len(fitting) > 1:
            fitting = [params[depth]] if depth < len(params) and params[depth] in fitting else fitting[:1]
        if fitting:
            pairs.append(ExpertPair(roles["lora_A"], roles["lora_B"], layout.param_shapes[fitting[0]][0], fitting[0]))
    return pairs


def b_first(pair: ExpertPair, adapter: AdapterInfo, layout: ModelLayout) -> bool | None:
    """Whether expert e's update is B_e @ A_e in the parameter's layout (else its transpose); None
    when the pair fits neither way (another model). Square experts take today's PEFT's reading."""
    _, d1, d2 = layout.param_shapes[pair.parameter]
    a_cols, b_rows = adapter.tensors[pair.a_key].shape[1], adapter.tensors[pair.b_key].shape[0]
    if (d1, d2) == (b_rows, a_cols) and (d1, d2) != (a_cols, b_rows):
        return True
    if (d1, d2) == (a_cols, b_rows) and (d1, d2) != (b_rows, a_cols):
        return False
    if (d1, d2) == (b_rows, a_cols):  # square: PEFT reads (E, out, in) unless the experts say transposed
        meta = layout.modules.get(pair.parameter.rsplit(".", 1)[0])
        return not (meta is not None and meta.transposed)
    return None


def pair_scale(pair: ExpertPair, adapter: AdapterInfo, module: str) -> tuple[float, int]:
    config = adapter.config
    alpha = pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
    rank = pattern_value(config.get("rank_pattern"), module, config.get("r", 8))
    return lora_scale(alpha, rank, adapter.use_rslora), rank


@dataclass
class ExpertPlan:
    """Which checkpoint tensors take which pair's update, and what is wrong."""

    deltas: dict[str, ExpertDelta]  # checkpoint key -> its update
    usage: dict[str, str]  # adapter key -> where it went
    problems: list[str]
    mapped: set[str]  # modules whose stacked-expert LoRA the stream engine applies


def plan_expert_lora(base: CheckpointInfo, adapter: AdapterInfo, layout: ModelLayout, pairs: list[ExpertPair]) -> ExpertPlan:
    plan = ExpertPlan({}, {}, [], set())
    stacked_in_checkpoint = {layout.to_model_key.get(k, k): k for k, meta in base.tensors.items() if len(meta.shape) == 3}
    sources: dict[str, dict[tuple[int, int], str]] = {}  # parameter -> (expert, source index) -> checkpoint key
    for key in base.tensors:
        found = layout.expert_source(key)
        if found:
            sources.setdefault(found[0], {})[(found[1], found[2])] = key
    for pair in pairs:
        module = pair.parameter.rsplit(".", 1)[0]
        first = b_first(pair, adapter, layout)
        a, b = adapter.tensors[pair.a_key], adapter.tensors[pair.b_key]
        scale, rank = pair_scale(pair, adapter, module)
        if first is None or a.shape[0] != pair.experts * rank or b.shape[1] != pair.experts * rank:
            plan.problems.append(f"{pair.a_key}: LoRA A {list(a.shape)} / B {list(b.shape)} do not fit {pair.parameter} "
                                 f"{list(layout.param_shapes[pair.parameter])} with r={rank} per expert: the adapter was "
                                 "trained on another model or saved by another tool; re-save it")
            continue
        delta = ExpertDelta(pair.a_key, pair.b_key, scale, pair.experts, None, first)
        if pair.parameter in stacked_in_checkpoint and pair.parameter not in sources:
            plan.deltas[stacked_in_checkpoint[pair.parameter]] = delta  # stored stacked, as the model holds it
        elif not _per_expert(plan, base, layout, pair, delta, sources.get(pair.parameter, {})):
            continue
        plan.usage[pair.a_key] = plan.usage[pair.b_key] = f"stacked-expert LoRA on {pair.parameter}"
        plan.mapped.add(module)
    return plan


def _per_expert(plan: ExpertPlan, base: CheckpointInfo, layout: ModelLayout, pair: ExpertPair, delta: ExpertDelta,
                found: dict[tuple[int, int], str]) -> bool:
    """Slices of the update for every per-expert checkpoint tensor of the parameter; False (and a
    problem) when an expert or a source is missing, so no expert silently keeps its base weight."""
    from dataclasses import replace

    fusion = next((f for f in layout.expert_fusions if pair.parameter.endswith(f.target)), None)
    count = len(fusion.sources) if fusion else 1
    missing = [(e, s) for e in range(pair.experts) for s in range(count) if (e, s) not in found]
    if not found or missing:
        where = f"expert {missing[0][0]}" + (f" ({fusion.sources[missing[0][1]]})" if fusion and count > 1 else "") if found else "any expert"
        plan.problems.append(f"{pair.parameter}: the adapter trains all {pair.experts} experts but the base checkpoint has no "
                             f"tensor for {where}; merging would leave them untrained: the base is not the model the adapter "
                             "was trained on")
        return False
    if count > 1 and fusion.concat_dim != 1:
        plan.problems.append(f"{pair.parameter}: transformers stacks its experts' tensors along dimension {fusion.concat_dim}, "
                             "which merger does not split; use --engine peft")
        return False
    for expert in range(pair.experts):
        offset = 0
        for source in range(count):
            key = found[(expert, source)]
            plan.deltas[key] = replace(delta, expert=expert, row_offset=offset)
            offset += base.tensors[key].shape[0]
    return True
