"""plan_merge: facts in, decisions out. No torch, no disk.

The plan says, for every tensor of the output checkpoint, where its values come from and what
is applied to them; which rows the embedding and head get and why; what the config says after
the merge; which tokenizer is written; and which adapter tensor went where. Both engines execute
the same plan; inspection prints it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace

from .adapter import AdapterInfo
from .checkpoint import CheckpointInfo
from .keys import module_leaf
from .layout import ModelLayout
from .lora import lora_scale, pattern_value
from .options import MergeOptions
from .plan_rules import (
    base_mutating_init_problem,
    base_shape_problems,
    declared_but_missing,
    choose_tokenizer,
    embed_extra_rows,
    hard_tied_head_note,
    is_module_copy,
    prefer,
    quantization_problem,
    serving_config_edits,
    trained_on,
    unmatched_targets,
)
from .vocab import Evidence, VocabDecision, decide_side, follow_other_side

FLOAT_TAGS = {"F32", "F16", "BF16", "F64"}
CLASSIFIER_HEADS = ("score", "classifier")  # task heads an adapter may bring whole


@dataclass(frozen=True)
class LoraDelta:
    a_key: str
    b_key: str
    scale: float
    kind: str  # "linear", "conv1d" or "embedding"
    magnitude_key: str | None = None  # DoRA


@dataclass(frozen=True)
class TensorOp:
    """How one output tensor is made: start, resize, overwrite rows, add deltas (in that order)."""

    out_key: str
    shape: tuple[int, ...]
    base_key: str | None  # base checkpoint tensor to start from
    replace_key: str | None = None  # adapter tensor that replaces the start (modules_to_save)
    grow_from_rows: int | None = None  # rows of the start before resizing to shape[0]
    token_rows_key: str | None = None  # adapter trainable-token values
    token_indices: tuple[int, ...] = ()
    lora: LoraDelta | None = None
    cast: bool = True  # floating tensors take the output dtype
    parameter_lora: bool = False  # LoRA on this raw parameter, merged by PEFT (see MergePlan.parameter_lora)

    @property
    def action(self) -> str:
        if self.lora or self.parameter_lora:
            return "lora-merged"
        if self.replace_key:
            return "replaced"
        if self.token_rows_key:
            return "rows-updated"
        if self.grow_from_rows is not None and self.grow_from_rows != self.shape[0]:
            return "resized"
        return "copied"


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
    # embedding rows beyond vocab_size by the model's design (Mllama: 8); 0 for nearly every model
    embed_extra_rows: int = 0
    # of those, rows the merge appends because the adapter was trained without them (transformers'
    # resize drops them): the trained model had embed.rows - embed_design_pad rows
    embed_design_pad: int = 0
    # decisions about OUT's other files that readers depend on (metadata.OutputFiles), from the input files
    outputs: object | None = None

    @property
    def stories(self) -> list[str]:
        return [d.story for d in (self.embed, self.head) if d is not None]

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


def resolve_module(layout: ModelLayout, module: str) -> str | None:
    """The model-namespace module an adapter key names (LLaVA-style renames included)."""
    if module in layout.modules:
        return module
    mapped = layout.to_model_key.get(module + ".weight")
    if mapped and mapped.endswith(".weight"):
        return mapped[: -len(".weight")]
    return None


def _token_indices(config: dict, module: str) -> tuple[int, ...] | None:
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


def plan_merge(base: CheckpointInfo, adapter: AdapterInfo, layout: ModelLayout, options: MergeOptions,
               embed_head_equal: bool | None = None) -> MergePlan:
    problems: list[str] = []
    notes: list[str] = list(adapter.warnings)
    config = adapter.config
    to_ckpt = layout.to_checkpoint_key()

    # --- group adapter tensors by the model module they belong to
    by_module: dict[str, dict[str, str]] = defaultdict(dict)
    usage: dict[str, str] = {}
    absent: list[str] = []
    parameter_lora: set[str] = set()
    for key in adapter.keys:
        owner = _parameter_lora_owner(key, layout, config)
        if owner is not None:
            usage[key.key] = f"parameter LoRA on {owner} (merged by PEFT)"
            parameter_lora.add(owner)
            continue
        module = resolve_module(layout, key.module)
        if module is None and key.role in ("full_weight", "full_bias") and module_leaf(key.module) in CLASSIFIER_HEADS:
            module = key.module  # a new task head (a classifier's 'score') the base lacks
        if module is None:
            absent.append(key.module)
            usage[key.key] = "absent"  # reported once below, not again as unused
            continue
        roles = by_module[module]
        if key.role in roles:  # e.g. save_embedding_layers also writes X.weight beside X.modules_to_save.weight
            keep, spare = prefer(roles[key.role], key.key)
            if adapter.tensors[keep].shape != adapter.tensors[spare].shape:
                problems.append(f"{spare}: a second copy of {keep} with another shape ({list(adapter.tensors[spare].shape)} vs {list(adapter.tensors[keep].shape)}); the adapter file is inconsistent")
            roles[key.role] = keep
            usage[spare] = f"duplicate of {keep}"
        else:
            roles[key.role] = key.key
    if absent:
        modules = sorted(set(absent))
        problems.append(
            f"{len(modules)} modules the adapter targets do not exist in the base {layout.class_name} "
            f"({', '.join(modules[:3])}{' ...' if len(modules) > 3 else ''}); {trained_on(adapter)}"
        )

    mutating = base_mutating_init_problem(adapter)
    if mutating:
        problems.append(mutating)
    missing = declared_but_missing(adapter, layout, lambda key: resolve_module(layout, key.module) or key.module)
    if missing:
        problems.append(f"{adapter.folder / 'adapter_config.json'}: declares trained modules the adapter file does not hold "
                        f"({', '.join(missing[:4])}); merging would keep the base's values where training changed them. "
                        "Re-save the adapter with them (PEFT's PiSSA/OLoRA conversion drops them: save the trained "
                        "modules from the training run's own checkpoint)")

    quantized = quantization_problem(base, adapter)
    if quantized:
        problems.append(quantized)
    else:
        problems.extend(base_shape_problems(base, layout))

    embed_mod, head_mod = layout.embed_module, layout.head_module
    embed_w = f"{embed_mod}.weight" if embed_mod else None
    head_w = f"{head_mod}.weight" if head_mod else None
    embed_base_rows = layout.param_shapes[embed_w][0] if embed_w in layout.param_shapes else None
    embed_ckpt_key = to_ckpt.get(embed_w) if embed_w else None
    if embed_ckpt_key in base.tensors:
        embed_base_rows = base.tensors[embed_ckpt_key].shape[0]
    head_ckpt_key = to_ckpt.get(head_w) if head_w else None
    head_base_rows = base.tensors[head_ckpt_key].shape[0] if head_ckpt_key in base.tensors else embed_base_rows
    base_tied = layout.tied  # some tied checkpoints also store the head's copy; it is the same matrix

    # --- vocabulary evidence from the adapter's own tensors
    def evidence_for(module: str | None) -> tuple[list[Evidence], tuple[int, ...] | None]:
        if module is None:
            return [], None
        roles = by_module.get(module, {})
        found, supplied = [], None
        for role in ("full_weight", "original_weight"):
            if role in roles:
                found.append(Evidence(adapter.tensors[roles[role]].shape[0], f"{roles[role]}"))
        if "full_weight" in roles:
            supplied = None  # every row comes from the adapter
        if "lora_embedding_A" in roles:
            found.append(Evidence(adapter.tensors[roles["lora_embedding_A"]].shape[1], roles["lora_embedding_A"]))
        if "lora_B" in roles and module == head_mod:
            found.append(Evidence(adapter.tensors[roles["lora_B"]].shape[0], roles["lora_B"]))
        if "trainable_tokens" in roles:
            indices = _token_indices(config, module) or ()
            if indices:
                found.append(Evidence(max(indices) + 1, f"trainable token ids up to {max(indices)}", exact=False))
            supplied = tuple(indices)
        elif "full_weight" not in roles:
            supplied = ()
        return found, supplied

    tok_len = adapter.tokenizer.id_bound if adapter.tokenizer else None
    base_tok_len = base.tokenizer.id_bound if base.tokenizer else None
    embed_extra = embed_extra_rows(layout, embed_w, head_w)
    embed_design_pad = 0
    embed = head = None
    if embed_mod and embed_base_rows is not None:
        ev, supplied = evidence_for(embed_mod)
        embed = decide_side(module_leaf(embed_mod), embed_base_rows, ev, tok_len, options.pad_to_multiple_of,
                            None if supplied is None else supplied, base_tok_len)
    if head_mod and head_base_rows is not None and embed is not None:
        ev, supplied = evidence_for(head_mod)
        own = decide_side(module_leaf(head_mod), head_base_rows, ev, tok_len, options.pad_to_multiple_of,
                          None if supplied is None else supplied, base_tok_len)
        if own.source != "adapter" and embed.rows - embed_extra != own.rows:
            head = follow_other_side(module_leaf(head_mod), head_base_rows, embed, tok_len, supplied, -embed_extra)
        elif own.source == "adapter" and embed.source != "adapter" and own.rows != embed.rows - embed_extra:
            head = own
            ev_e, sup_e = evidence_for(embed_mod)
            embed = follow_other_side(module_leaf(embed_mod), embed_base_rows, own, tok_len, sup_e, embed_extra)
        else:
            head = own
        if embed_extra and head.rows == embed.rows:
            # transformers' resize_token_embeddings gave this model's embedding the head's rows,
            # dropping the design's extra rows (Mllama: vocab_size + 8): restore them past every
            # token id, filled by the new-rows rule, so the checkpoint loads and every token's
            # row and logit is the trained model's
            embed_design_pad = embed_extra
            story = (f"{embed.story}; {embed_extra} rows appended after them, as {layout.class_name} keeps its embedding "
                     f"{embed_extra} rows longer than its head (vocab_size + {embed_extra}) and transformers' resize dropped them")
            embed = replace(embed, rows=embed.rows + embed_extra, story=story,
                            notes=embed.notes + (f"{embed.name}: rows {embed.rows}-{embed.rows + embed_extra - 1} restore "
                                                 f"{layout.class_name}'s design rows; no token uses them",))
        if head.rows != embed.rows - embed_extra:
            design = (f"; {layout.class_name} gives its embedding {embed_extra} rows more than its head (vocab_size + {embed_extra}), "
                      "which transformers' resize_token_embeddings does not keep for it, so the model this adapter was "
                      "trained on cannot be saved loadably and merger will not guess its rows"
                      if embed_extra else "")
            problems.append(
                f"{head_mod}: the adapter's head has {head.rows} rows but its embedding {embed.rows}; "
                f"a checkpoint with these sizes cannot be loaded by from_pretrained{design}"
            )
    for decision in (embed, head):
        inherited = bool(decision and base_tok_len and decision.tokenizer_len and decision.tokenizer_len <= base_tok_len
                         and decision.rows >= decision.base_rows)  # the base itself has ids without rows
        if decision and decision.source == "adapter" and decision.tokenizer_len and decision.rows < decision.tokenizer_len and not inherited:
            problems.append(
                f"the adapter's tokenizer has ids up to {decision.tokenizer_len - 1} but {decision.name} has "
                f"{decision.rows} rows: ids {decision.rows}-{decision.tokenizer_len - 1} would index past the matrix; "
                "pass --tokenizer base or the tokenizer used in training"
            )

    # --- tie decision
    head_roles = by_module.get(head_mod, {}) if head_mod else {}
    embed_roles = by_module.get(embed_mod, {}) if embed_mod else {}
    # a full embedding that is not a modules_to_save copy replaces the base layer itself, which a
    # tied head shares (PEFT loads it into the shared parameter)
    embed_full = embed_roles.get("full_weight")
    embed_full_shared = bool(embed_full) and not is_module_copy(embed_full, embed_mod, adapter.modules_to_save)
    tie = base_tied
    if base_tied:
        head_changes = {r for r in head_roles if r != "original_weight"}
        embed_changes = {r for r in embed_roles if r != "original_weight"}
        if config.get("ensure_weight_tying") or config.get("modules_to_tie"):
            tie = True
        elif not head_changes and embed_changes <= {"trainable_tokens"}:
            tie = True  # nothing, or trainable tokens, which PEFT ties to the head: both change alike
        elif not head_changes and embed_changes == {"full_weight"} and embed_full_shared:
            tie = True
        elif head_changes == embed_changes:
            tie = bool(embed_head_equal)  # the same kinds of tensors on both sides: tied if equal
        else:
            tie = False
        if not tie:
            notes.append(f"{head_mod} and {module_leaf(embed_mod)} were tied in the base, but the adapter changes them differently; the output is untied")
    if tie and head is not None and embed is not None:
        # a tied head is the embedding: its rows, trained or not, are the embedding's
        head = VocabDecision(head.name, head.base_rows, embed.rows, tok_len, "tied",
                             f"{head.name}: tied to {embed.name} ({embed.rows} rows)", embed.supplied_rows)
    for decision in (embed, head):
        if decision:
            notes.extend(decision.notes)

    dtype = base.dtype if options.dtype == "auto" else options.dtype

    # --- one op per output tensor
    ops: list[TensorOp] = []
    seen_out: set[str] = set()
    scale_cfg = dict(alpha=config.get("lora_alpha", 8), r=config.get("r", 8))

    def add_usage(keys, out_key):
        for k in keys:
            if k in usage:
                problems.append(f"{k}: used twice ({usage[k]} and {out_key})")
            usage[k] = out_key

    def lora_for(module: str, roles: dict[str, str], target_rows: int | None) -> LoraDelta | None:
        meta = layout.modules.get(module)
        if "lora_A" in roles and "lora_B" in roles:
            a_key, b_key = roles["lora_A"], roles["lora_B"]
            kind = meta.kind if meta else "other"
        elif "lora_embedding_A" in roles and "lora_embedding_B" in roles:
            a_key, b_key, kind = roles["lora_embedding_A"], roles["lora_embedding_B"], "embedding"
        else:
            for role in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
                if role in roles:
                    problems.append(f"{roles[role]}: its LoRA partner is missing from the adapter file; re-save the adapter")
            return None
        if kind not in ("linear", "conv1d", "embedding"):
            problems.append(f"{a_key}: LoRA on a {kind} module ({module}) is not supported; only Linear, Conv1D and Embedding")
            return None
        # A is (r, columns A reads), B is (rows B writes, r); which base dimension each is depends on the layer
        rows, cols = meta.weight_shape
        a_cols, b_rows = {"linear": (cols, rows), "conv1d": (rows, cols), "embedding": (rows, cols)}[kind]
        if target_rows is not None:  # a resized embedding or head
            a_cols, b_rows = (target_rows, b_rows) if kind == "embedding" else (a_cols, target_rows)
        a, b = adapter.tensors[a_key], adapter.tensors[b_key]
        if len(a.shape) != 2 or len(b.shape) != 2:
            problems.append(f"{module}: LoRA A {list(a.shape)} / B {list(b.shape)} are not matrices, as PEFT saves them for a "
                            f"{kind} layer; the adapter file is corrupt or from another tool: re-save the adapter")
            return None
        if a.shape[1] != a_cols or b.shape[0] != b_rows or a.shape[0] != b.shape[1]:
            problems.append(
                f"{module}: {'lora_embedding_A' if kind == 'embedding' else 'lora_A'} {list(a.shape)} / B {list(b.shape)} "
                f"do not fit the base weight {list(meta.weight_shape)} (A needs {a_cols} columns, B {b_rows} rows): "
                f"the adapter was trained on another architecture or size; {trained_on(adapter)}"
            )
            return None
        alpha = pattern_value(config.get("alpha_pattern"), module, scale_cfg["alpha"])
        rank = pattern_value(config.get("rank_pattern"), module, scale_cfg["r"]) or a.shape[0]
        if a.shape[0] != rank:  # PEFT would refuse to load it; its scale alpha/r would be wrong here
            problems.append(f"{a_key}: rank {a.shape[0]} but adapter_config.json gives this module r={rank} "
                            "(r, or its rank_pattern entry): the config and the weights disagree; re-save the adapter")
            return None
        magnitude = roles.get("lora_magnitude")
        add_usage([a_key, b_key] + ([magnitude] if magnitude else []), module)
        return LoraDelta(a_key, b_key, lora_scale(alpha, rank, adapter.use_rslora), kind, magnitude)

    def vocab_for(module: str) -> VocabDecision | None:
        if module == embed_mod:
            return embed
        if module == head_mod:
            return head
        return None

    def make_op(out_key: str, module: str | None, param: str, base_key: str | None, base_shape) -> TensorOp:
        roles = by_module.get(module, {}) if module else {}
        # a head's bias has one entry per vocabulary row (Phi, some GPT-2 variants): it grows with the head
        decision = vocab_for(module) if param == "weight" or (param == "bias" and module == head_mod) else None
        rows = decision.rows if decision else None
        shape = tuple(base_shape) if base_shape is not None else None
        replace = roles.get("full_weight" if param == "weight" else "full_bias")
        if replace:
            rshape = adapter.tensors[replace].shape
            if shape is not None and decision is None and tuple(rshape) != shape:
                problems.append(f"{replace}: shape {list(rshape)} does not match the base's {out_key} {list(shape)}: the adapter was trained on another model; {trained_on(adapter)}")
            shape = tuple(rshape)
            add_usage([replace], out_key)
        if rows is not None and shape is not None:
            shape = (rows,) + tuple(shape[1:])
        grow_from = None
        if decision is not None and not replace:
            grow_from = base_shape[0]
        if "original_weight" in roles and param == "weight":
            add_usage([roles["original_weight"]], "evidence")
        if "original_bias" in roles and param == "bias":
            add_usage([roles["original_bias"]], "evidence")
        token_key, indices = None, ()
        lora = None
        if param == "weight":
            if "trainable_tokens" in roles:
                token_key = roles["trainable_tokens"]
                indices = _token_indices(config, module) or ()
                tshape = adapter.tensors[token_key].shape
                if len(indices) != tshape[0] or (shape and tshape[1] != shape[1]):
                    problems.append(f"{token_key}: holds {list(tshape)} values for {len(indices)} token ids {list(indices)[:6]}; the adapter config and weights disagree")
                elif shape and max(indices, default=0) >= shape[0]:
                    problems.append(f"{token_key}: token id {max(indices)} is past the {shape[0]} rows of {module}")
                add_usage([token_key], out_key)
            lora = lora_for(module, roles, rows) if module else None
        elif "lora_B_bias" in roles:
            problems.append(f"{roles['lora_B_bias']}: LoRA bias (lora_bias=True) is not supported yet")
        return TensorOp(out_key, shape, base_key, replace, grow_from, token_key, tuple(indices), lora,
                        cast=base_key is None or base.tensors[base_key].dtype in FLOAT_TAGS)

    targeted_params = tuple(config.get("target_parameters") or ())
    for ckpt_key, meta in base.tensors.items():
        model_key = layout.to_model_key.get(ckpt_key, ckpt_key)
        module, _, param = model_key.rpartition(".")
        if base_tied and head_w and model_key == head_w:
            continue  # a stored copy of a tied head: written below only if the output unties
        op = make_op(ckpt_key, module, param, ckpt_key, meta.shape)
        if module in parameter_lora and any(model_key == t or model_key.endswith("." + t) for t in targeted_params):
            op = replace(op, parameter_lora=True)
        ops.append(op)
        seen_out.add(ckpt_key)

    # the head, when the base stored it tied and the output unties it
    if base_tied and not tie and head_mod:
        out_key = head_ckpt_key or to_ckpt.get(head_w) or head_w
        start_key = head_ckpt_key if head_ckpt_key in base.tensors else embed_ckpt_key
        op = make_op(out_key, head_mod, "weight", start_key, base.tensors[start_key].shape)
        shared = embed_full if embed_full_shared else embed_roles.get("original_weight")
        if shared and not op.replace_key:
            # the head keeps the shared layer as PEFT's unmerged model has it: the replaced layer,
            # or the original module (with its resized rows) that the adapter saved
            op = replace(op, replace_key=shared, grow_from_rows=None,
                         shape=(adapter.tensors[shared].shape[0],) + tuple(op.shape[1:]))
        ops.append(op)
        seen_out.add(out_key)
    elif base_tied and tie and head_roles:
        # tied and staying tied: the head's own copies are the embedding's, accounted there
        for key in head_roles.values():
            if key not in usage:
                usage[key] = "tied:" + (embed_ckpt_key or "")

    # modules the base lacks: a new task head saved whole (e.g. a classifier's 'score')
    for module, roles in by_module.items():
        if module in layout.modules and (f"{module}.weight" in to_ckpt or f"{module}.bias" in to_ckpt):
            continue
        for role, param in (("full_weight", "weight"), ("full_bias", "bias")):
            if role in roles and roles[role] not in usage:
                out_key = f"{module}.{param}"
                if out_key in seen_out:
                    continue
                ops.append(make_op(out_key, module, param, None, None))
                seen_out.add(out_key)

    unused = [k.key for k in adapter.keys if k.key not in usage]
    if unused and not problems:
        problems.append(f"adapter tensors that would not be used: {', '.join(unused[:6])}{' ...' if len(unused) > 6 else ''}; merger refuses to drop them")

    # --- config edits
    edits: dict = {}
    if embed is not None:
        for path in base.vocab_size_fields() or {"vocab_size": None}:
            edits[path] = embed.rows - embed_extra
        if base.text_config_key and f"{base.text_config_key}.vocab_size" not in edits:
            edits[f"{base.text_config_key}.vocab_size"] = embed.rows - embed_extra
    edits.update(serving_config_edits(base, tie, base_tied, dtype))
    if layout.config_overrides:
        edits.update(layout.config_overrides)
        edits["architectures"] = [layout.class_name]

    unmatched = unmatched_targets(config.get("target_modules"), layout)
    if unmatched:
        notes.append(f"target_modules entries that match nothing in the base: {', '.join(unmatched)}")
    tok_source, tok_reason = choose_tokenizer(base, adapter, options)
    hard_tied = hard_tied_head_note(base, tie)
    if hard_tied:
        notes.append(hard_tied)
    blockers = _stream_blockers(layout, adapter)
    if parameter_lora:
        targets = ", ".join(config.get("target_parameters") or [])
        blockers.append(f"LoRA on raw parameters (target_parameters: {targets}) is merged by PEFT itself")
        notes.append(f"{len(parameter_lora)} modules carry LoRA on raw parameters ({targets}); PEFT's merge_and_unload "
                     "merges them, and validation compares the merged logits with base + unmerged adapter")
    # a quantized base, then shape mismatches: they say the most about what went wrong
    problems.sort(key=lambda p: -1 if p == quantized else 0 if "another architecture" in p or "another model" in p else 1)
    return MergePlan(base, adapter, layout, options, embed, head, tie, dtype, tuple(ops), edits,
                     tok_source, tok_reason, usage, tuple(notes), tuple(blockers), tuple(problems),
                     tuple(sorted(parameter_lora)), embed_extra, embed_design_pad)


def _parameter_lora_owner(key, layout: ModelLayout, config: dict) -> str | None:
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


def _stream_blockers(layout: ModelLayout, adapter: AdapterInfo) -> list[str]:
    blockers = []
    if layout.key_layout_problem:
        blockers.append(layout.key_layout_problem)
    return blockers
