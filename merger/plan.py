"""plan_merge: facts in, decisions out. No torch, no disk.

The plan says, for every tensor of the output checkpoint, where its values come from and what
is applied to them; which rows the embedding and head get and why; what the config says after
the merge; which tokenizer is written; and which adapter tensor went where. Both engines execute
the same plan; inspection prints it.

plan_merge is a composition of named steps, each testable without torch:
group the adapter's tensors (plan_groups) -> decide the vocabulary and the tie (plan_vocab) ->
one op per output tensor (plan_ops) -> account for every adapter tensor, edit the config.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from .adapter import AdapterInfo
from .checkpoint import CheckpointInfo
from .layout import ModelLayout
from .options import MergeOptions
from .plan_groups import AdapterGroups, group_adapter_tensors, resolve_module
from .plan_ops import FLOAT_TAGS, LoraDelta, OpBuilder, TensorOp, unused_adapter_tensors
from .plan_rules import (
    base_mutating_init_problem,
    base_shape_problems,
    choose_tokenizer,
    declared_but_missing,
    dequantization_edits,
    hard_tied_head_note,
    quantization_problem,
    serving_config_edits,
    unmatched_targets,
)
from .drift import scaled_embedding_drift
from .plan_experts import expert_pairs, plan_expert_lora
from .plan_rules import qlora_evidence
from .plan_vocab import VocabularyPlan, decide_vocabulary
from .vocab import VocabDecision

__all__ = ["FLOAT_TAGS", "LoraDelta", "MergePlan", "TensorOp", "plan_merge", "resolve_module"]


@dataclass(frozen=True, repr=False)
class MergePlan:
    base: CheckpointInfo
    adapter: AdapterInfo
    layout: ModelLayout
    options: MergeOptions
    embed: VocabDecision | None
    head: VocabDecision | None
    tie_word_embeddings: bool
    dtype: str
    ops: tuple[TensorOp, ...]
    config_edits: dict
    tokenizer_source: str | None
    tokenizer_reason: str
    adapter_usage: dict  # adapter key -> out key (or "evidence" for read-only copies)
    notes: tuple[str, ...] = field(default=())
    stream_blockers: tuple[str, ...] = field(default=())
    problems: tuple[str, ...] = field(default=())  # non-empty: the merge is refused
    # modules whose raw parameters carry LoRA (target_parameters, e.g. stacked MoE experts): only
    # PEFT knows how its wrapper reshapes them, so the peft engine merges them and validation checks logits
    parameter_lora: tuple[str, ...] = field(default=())
    # modules another PEFT type adapts (LoHa, LoKr, IA3, OFT, ...): PEFT's merge_and_unload merges
    # them on the peft engine, and validation compares logits
    peft_merged: tuple[str, ...] = field(default=())
    # adapter module names older transformers used -> this model's (plan_groups: transformers' renaming rules)
    module_renames: tuple[tuple[str, str], ...] = field(default=())
    # per-expert Linear modules of the checkpoint an older adapter trained (plan_groups.checkpoint_modules):
    # today's transformers stacks them, so PEFT cannot load the adapter; the stream engine merges it
    checkpoint_modules: tuple[str, ...] = field(default=())
    # an older PEFT trained the scaled embedding without its factor (drift.ScaledEmbeddingDrift): the
    # stream engine reproduces that model, PEFT today would merge another, and validation emulates it
    embedding_drift: object | None = None
    # embedding rows beyond vocab_size by the model's design (Mllama: 8); 0 for nearly every model
    embed_extra_rows: int = 0
    # of those, rows the merge appends because the adapter was trained without them (transformers'
    # resize drops them): the trained model had embed.rows - embed_design_pad rows
    embed_design_pad: int = 0
    # decisions about OUT's other files that readers depend on (metadata.OutputFiles), from the input files
    outputs: object | None = None
    # stacked adapters (stack.py): the plan of the stage before this one, whose output is this
    # plan's ``base`` (a virtual checkpoint: same folder, the previous stage's shapes and config)
    previous: "MergePlan | None" = None

    @property
    def stages(self) -> list["MergePlan"]:
        """Every stage's plan, first to last (one for a single adapter)."""
        chain, plan = [], self
        while plan is not None:
            chain.append(plan)
            plan = plan.previous
        return chain[::-1]

    @property
    def peft_blockers(self) -> list[str]:
        """Why the peft engine cannot run this plan: it would merge what today's PEFT computes, not what was trained."""
        reasons = []
        for i, stage in enumerate(self.stages, 1):
            if stage.embedding_drift is not None:
                reasons.append(f"stage {i}: {stage.adapter.folder} was trained by PEFT < 0.18 on a scaled embedding, which "
                               "today's PEFT computes otherwise; the stream engine reproduces the trained model")
            if stage.checkpoint_modules:
                reasons.append(f"stage {i}: {stage.adapter.folder} trains per-expert modules ({stage.checkpoint_modules[0]}, ...) "
                               "that today's transformers stacks into one parameter, so PEFT cannot load it; the stream engine "
                               "merges it into the checkpoint's per-expert tensors")
        return reasons

    @property
    def merged_by_peft(self) -> bool:
        """Some stage has modules only PEFT's own merge handles: only a logits comparison proves them."""
        return any(stage.parameter_lora or stage.peft_merged for stage in self.stages)

    @property
    def metadata_folders(self) -> tuple:
        """Folders whose generation config and card OUT takes, the first that has one: the adapters,
        last stage first, then the base."""
        return tuple(stage.adapter.folder for stage in reversed(self.stages)) + (self.base.folder,)

    @property
    def first(self) -> "MergePlan":
        """The first stage, whose base is the real base checkpoint."""
        return self.stages[0]

    @property
    def stories(self) -> list[str]:
        stages = self.stages
        if len(stages) == 1:
            return [d.story for d in (self.embed, self.head) if d is not None]
        return [f"stage {i} ({stage.adapter.folder.name}): {d.story}" for i, stage in enumerate(stages, 1)
                for d in (stage.embed, stage.head) if d is not None]

    def __repr__(self) -> str:
        from .render import plan_text

        return plan_text(self)

    def _repr_html_(self) -> str:
        from .render import html_block, plan_text

        return html_block("merge plan", plan_text(self))

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for op in self.ops:
            counts[op.action] += 1
        return dict(counts)


def plan_merge(base: CheckpointInfo, adapter: AdapterInfo, layout: ModelLayout, options: MergeOptions,
               embed_head_equal: bool | None = None, intermediate: bool = False) -> MergePlan:
    """``intermediate``: a stage before the last of a stack (its output is what the next stage trained on)."""
    groups = group_adapter_tensors(adapter, layout)
    problems = list(groups.problems) + adapter_problems(adapter, layout, options)
    quantized = quantization_problem(base, adapter)
    problems.extend([quantized] if quantized else base_shape_problems(base, layout))

    dtype = base.dtype if options.dtype == "auto" else options.dtype
    drift, drift_problem = scaled_embedding_drift(adapter, layout, groups.roles(layout.embed_module), dtype)
    if drift_problem:
        problems.append(drift_problem)
    untie = "the head keeps the unscaled matrix it was trained with" if drift and drift.kind == "tokens" else None
    vocab = decide_vocabulary(base, adapter, layout, groups, options, embed_head_equal, untie, intermediate)
    problems.extend(vocab.problems)
    experts = plan_expert_lora(base, adapter, layout, expert_pairs(adapter, layout, groups.parameter_owner))
    problems.extend(experts.problems)
    streamed_parameter_lora(groups, experts)
    builder = OpBuilder(base, adapter, layout, groups, vocab, drift, experts.deltas, options.merge_base)
    ops = builder.build()
    problems.extend(builder.problems)
    unused = unused_adapter_tensors(adapter, groups.usage)
    if unused and not problems:
        problems.append(f"adapter tensors that would not be used: {', '.join(unused[:6])}{' ...' if len(unused) > 6 else ''}; "
                        "merger refuses to drop them")

    notes = list(adapter.warnings) + list(vocab.notes)
    if drift:
        notes.append(drift.note(adapter, layout.embed_module))
    trained_base = qlora_evidence(adapter)
    if options.merge_base == "nf4":
        count = sum(1 for op in ops if op.requantize)
        notes.append(f"--merge-base nf4: {count} Linear weights are first rounded through bitsandbytes' NF4 (double quant, "
                     f"blocks of 64), as the 4-bit base of a QLoRA run held them"
                     + (f"; {trained_base}" if trained_base else "; nothing in the adapter folder records a 4-bit base"))
    elif trained_base:
        notes.append(f"{trained_base}: it was trained against dequant(nf4(W)); --merge-base nf4 merges into that, "
                     "the default merges into the original weights")
    if options.residual_base and base_mutating_init_problem(adapter):
        notes.append(f"--residual-base: {base.folder} is taken to be the base that init_lora_weights="
                     f"{adapter.config.get('init_lora_weights')!r} rewrote when training started; the adapter is merged into it as it is")
    if groups.renamed:
        old, new = next(iter(groups.renamed.items()))
        notes.append(f"{len(groups.renamed)} adapter modules carry the names older transformers gave {layout.class_name}'s modules "
                     f"(e.g. {old} is now {new}; transformers < 4.52 named VLM modules so): mapped by transformers' own renaming "
                     "rules")
    unmatched = unmatched_targets(adapter.config.get("target_modules"), layout)
    if unmatched:
        notes.append(f"target_modules entries that match nothing in the base: {', '.join(unmatched)}")
    tok_source, tok_reason = choose_tokenizer(base, adapter, options)
    hard_tied = hard_tied_head_note(base, vocab.tie)
    if hard_tied:
        notes.append(hard_tied)
    blockers = [layout.key_layout_problem] if layout.key_layout_problem else []
    if experts.deltas:
        notes.append(f"{len({d.a_key for d in experts.deltas.values()})} LoRA pairs on stacked experts reach "
                     f"{len(experts.deltas)} checkpoint tensors, every expert of every one accounted for")
    if groups.parameter_lora:
        targets = ", ".join(adapter.config.get("target_parameters") or [])
        blockers.append(f"LoRA on raw parameters (target_parameters: {targets}) is merged by PEFT itself")
        notes.append(f"{len(groups.parameter_lora)} modules carry LoRA on raw parameters ({targets}); PEFT's merge_and_unload "
                     "merges them, and validation compares the merged logits with base + unmerged adapter")
    if groups.peft_merged:
        blockers.append(f"peft_type {adapter.peft_type} is merged by PEFT itself")
        notes.append(f"{len(groups.peft_merged)} modules carry {adapter.peft_type}; PEFT's merge_and_unload merges them, and "
                     "validation compares the merged logits with base + unmerged adapter")
    # a quantized base, then shape mismatches: they say the most about what went wrong
    problems.sort(key=lambda p: -1 if p == quantized else 0 if "another architecture" in p or "another model" in p else 1)
    # quantized base (block-FP8, MXFP4): dequantized to `dtype`, quantization_config removed, said in a note
    quant_edits, quant_note = dequantization_edits(base, dtype)
    notes.extend([quant_note] if quant_note else [])
    return MergePlan(base, adapter, layout, options, vocab.embed, vocab.head, vocab.tie, dtype, tuple(ops),
                     {**config_edits(base, layout, vocab, dtype), **quant_edits}, tok_source, tok_reason, groups.usage, tuple(notes),
                     tuple(blockers), tuple(problems), tuple(sorted(groups.parameter_lora)), tuple(sorted(groups.peft_merged)),
                     tuple(sorted(groups.renamed.items())), tuple(sorted(groups.checkpoint_modules)), drift, vocab.embed_extra, vocab.embed_design_pad)


def streamed_parameter_lora(groups: AdapterGroups, experts) -> None:
    """Modules whose every raw-parameter LoRA pair is a stacked-expert pair merger maps itself leave
    the PEFT-only set (the stream engine merges them; validation checks them per expert)."""
    for module in list(groups.parameter_lora):
        keys = [k for k, owner in groups.parameter_owner.items() if owner == module]
        if keys and all(k in experts.usage for k in keys):
            groups.parameter_lora.discard(module)
    groups.usage.update(experts.usage)


def adapter_problems(adapter: AdapterInfo, layout: ModelLayout, options: MergeOptions) -> list[str]:
    """What the adapter's config says that makes its tensors unusable on this base as they are."""
    problems = []
    mutating = base_mutating_init_problem(adapter)
    if mutating and not options.residual_base:  # --residual-base: the user says the base is the rewritten one
        problems.append(mutating)
    if options.residual_base and not mutating:
        problems.append(f"--residual-base: {adapter.folder / 'adapter_config.json'} has init_lora_weights="
                        f"{adapter.config.get('init_lora_weights', True)!r}, which never rewrote the base, so no residual base "
                        "exists for it; drop --residual-base and pass the original base")
    missing = declared_but_missing(adapter, layout, lambda key: resolve_module(layout, key.module) or key.module)
    if missing:
        problems.append(f"{adapter.folder / 'adapter_config.json'}: declares trained modules the adapter file does not hold "
                        f"({', '.join(missing[:4])}); merging would keep the base's values where training changed them. "
                        "Re-save the adapter with them (PEFT's PiSSA/OLoRA conversion drops them: save the trained "
                        "modules from the training run's own checkpoint)")
    return problems


def config_edits(base: CheckpointInfo, layout: ModelLayout, vocab: VocabularyPlan, dtype: str) -> dict:
    """config.json fields the merge changes: every vocab_size, the tie flags, the dtype, a new class."""
    edits: dict = {}
    if vocab.embed is not None:
        rows = vocab.embed.rows - vocab.embed_extra
        for path in base.vocab_size_fields() or {"vocab_size": None}:
            edits[path] = rows
        if base.text_config_key and f"{base.text_config_key}.vocab_size" not in edits:
            edits[f"{base.text_config_key}.vocab_size"] = rows
    edits.update(serving_config_edits(base, vocab.tie, layout.tied, dtype))
    if layout.config_overrides:
        edits.update(layout.config_overrides)
        edits["architectures"] = [layout.class_name]
    return edits
