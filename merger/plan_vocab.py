"""Planning step 2: the rows of the embedding and the head, and whether they stay tied.

Pure: the rows come from the adapter's own tensors (vocab.py weighs the evidence); this step
reconciles the two sides, restores rows a model keeps by design, and decides the tie.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .adapter import AdapterInfo
from .checkpoint import CheckpointInfo
from .keys import module_leaf
from .layout import ModelLayout
from .options import MergeOptions
from .plan_groups import AdapterGroups, token_indices
from .plan_rules import embed_extra_rows, is_module_copy
from .vocab import Evidence, VocabDecision, decide_side, follow_other_side


@dataclass(frozen=True)
class VocabularyPlan:
    embed: VocabDecision | None
    head: VocabDecision | None
    tie: bool
    # embedding rows beyond vocab_size by the model's design (Mllama: 8), and of those, rows the
    # merge appends because the adapter was trained without them
    embed_extra: int = 0
    embed_design_pad: int = 0
    notes: tuple[str, ...] = field(default=())
    problems: tuple[str, ...] = field(default=())


def vocabulary_evidence(adapter: AdapterInfo, groups: AdapterGroups, module: str | None,
                        head_module: str | None) -> tuple[list[Evidence], tuple[int, ...] | None]:
    """What the adapter's tensors say about ``module``'s rows, and which rows it supplies values for
    (None: every row; (): none)."""
    if module is None:
        return [], None
    roles = groups.roles(module)
    found, supplied = [], None
    for role in ("full_weight", "original_weight"):
        if role in roles:
            found.append(Evidence(adapter.tensors[roles[role]].shape[0], f"{roles[role]}"))
    if "lora_embedding_A" in roles:
        found.append(Evidence(adapter.tensors[roles["lora_embedding_A"]].shape[1], roles["lora_embedding_A"]))
    if "lora_B" in roles and module == head_module:
        found.append(Evidence(adapter.tensors[roles["lora_B"]].shape[0], roles["lora_B"]))
    if "trainable_tokens" in roles:
        indices = token_indices(adapter.config, module) or ()
        if indices:
            found.append(Evidence(max(indices) + 1, f"trainable token ids up to {max(indices)}", exact=False))
        supplied = tuple(indices)
    elif "full_weight" not in roles:
        supplied = ()
    return found, supplied


def base_rows(base: CheckpointInfo, layout: ModelLayout) -> tuple[int | None, int | None]:
    """Rows of the base's embedding and head as stored (a tied head has the embedding's)."""
    to_ckpt = layout.to_checkpoint_key()
    embed_w = f"{layout.embed_module}.weight" if layout.embed_module else None
    head_w = f"{layout.head_module}.weight" if layout.head_module else None
    embed = layout.param_shapes[embed_w][0] if embed_w in layout.param_shapes else None
    embed_key = to_ckpt.get(embed_w) if embed_w else None
    if embed_key in base.tensors:
        embed = base.tensors[embed_key].shape[0]
    head_key = to_ckpt.get(head_w) if head_w else None
    head = base.tensors[head_key].shape[0] if head_key in base.tensors else embed
    return embed, head


def decide_vocabulary(base: CheckpointInfo, adapter: AdapterInfo, layout: ModelLayout, groups: AdapterGroups,
                      options: MergeOptions, embed_head_equal: bool | None, untie: str | None = None,
                      intermediate: bool = False) -> VocabularyPlan:
    """``untie``: why the output must untie a tied base whatever the adapter changes (a drift), or None.
    ``intermediate``: a stage before the last of a stack, whose output is the model the next stage
    was trained on (the pipeline's merge), not the trained model itself."""
    embed_mod, head_mod = layout.embed_module, layout.head_module
    embed_w = f"{embed_mod}.weight" if embed_mod else None
    head_w = f"{head_mod}.weight" if head_mod else None
    embed_base_rows, head_base_rows = base_rows(base, layout)
    problems: list[str] = []

    def evidence(module):
        return vocabulary_evidence(adapter, groups, module, head_mod)

    tok_len = adapter.tokenizer.id_bound if adapter.tokenizer else None
    base_tok_len = base.tokenizer.id_bound if base.tokenizer else None
    embed_extra = embed_extra_rows(layout, embed_w, head_w)
    embed_design_pad = 0
    embed = head = None
    if embed_mod and embed_base_rows is not None:
        ev, supplied = evidence(embed_mod)
        embed = decide_side(module_leaf(embed_mod), embed_base_rows, ev, tok_len, options.pad_to_multiple_of, supplied, base_tok_len)
    if head_mod and head_base_rows is not None and embed is not None:
        ev, supplied = evidence(head_mod)
        own = decide_side(module_leaf(head_mod), head_base_rows, ev, tok_len, options.pad_to_multiple_of, supplied, base_tok_len)
        if own.source != "adapter" and embed.rows - embed_extra != own.rows:
            head = follow_other_side(module_leaf(head_mod), head_base_rows, embed, tok_len, supplied, -embed_extra)
        elif own.source == "adapter" and embed.source != "adapter" and own.rows != embed.rows - embed_extra:
            head = own
            _, embed_supplied = evidence(embed_mod)
            embed = follow_other_side(module_leaf(embed_mod), embed_base_rows, own, tok_len, embed_supplied, embed_extra)
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

    tie, tie_notes = decide_tie(adapter, layout, groups, embed_head_equal, intermediate)
    if intermediate and layout.tied and "lora_A" in groups.roles(layout.head_module):
        problems.append(f"{layout.head_module}: a LoRA on the tied head in a stage before the last; the pipeline's "
                        "merge_and_unload wrote it into the matrix the embedding shares, which merger does not reproduce: "
                        "merge that stage on its own first and stack the rest on its output")
    if untie and tie and layout.tied:
        tie, tie_notes = False, [f"{layout.head_module} and {module_leaf(layout.embed_module)} were tied in the base; the "
                                 f"output is untied: {untie}"]
    if tie and head is not None and embed is not None:
        # a tied head is the embedding: its rows, trained or not, are the embedding's
        head = VocabDecision(head.name, head.base_rows, embed.rows, tok_len, "tied",
                             f"{head.name}: tied to {embed.name} ({embed.rows} rows)", embed.supplied_rows)
    notes = list(tie_notes) + [n for d in (embed, head) if d for n in d.notes]
    return VocabularyPlan(embed, head, tie, embed_extra, embed_design_pad, tuple(notes), tuple(problems))


def embed_replaces_shared_layer(adapter: AdapterInfo, layout: ModelLayout, groups: AdapterGroups) -> bool:
    """A full embedding that is not a modules_to_save copy replaces the base layer itself, which a
    tied head shares (PEFT loads it into the shared parameter)."""
    full = groups.roles(layout.embed_module).get("full_weight")
    return bool(full) and not is_module_copy(full, layout.embed_module, adapter.modules_to_save)


def decide_tie(adapter: AdapterInfo, layout: ModelLayout, groups: AdapterGroups,
               embed_head_equal: bool | None, intermediate: bool = False) -> tuple[bool, list[str]]:
    """Whether the output keeps a tied base's head tied: only when the adapter changes both alike.

    A LoRA on the embedding of a tied model changes only the embedding's forward, so the trained
    model's head is the base's: the output unties. But an earlier stage of a stack reproduces the
    pipeline's merge, which PEFT's merge_and_unload writes into the shared matrix: it stays tied
    (head and embedding both W + ΔW), as the next stage was trained on it."""
    if not layout.tied:
        return False, []
    head_changes = {r for r in groups.roles(layout.head_module) if r != "original_weight"}
    embed_changes = {r for r in groups.roles(layout.embed_module) if r != "original_weight"}
    lora_pair = {"lora_embedding_A", "lora_embedding_B"}
    shared_full = "full_weight" not in embed_changes or embed_replaces_shared_layer(adapter, layout, groups)
    if intermediate and not head_changes and lora_pair <= embed_changes <= lora_pair | {"full_weight"} and shared_full:
        return True, [f"{module_leaf(layout.embed_module)}'s LoRA is merged into the matrix it shares with "
                      f"{layout.head_module}, as the pipeline's merge_and_unload did before the next stage trained"]
    if adapter.config.get("ensure_weight_tying") or adapter.config.get("modules_to_tie"):
        tie = True
    elif not head_changes and embed_changes <= {"trainable_tokens"}:
        tie = True  # nothing, or trainable tokens, which PEFT ties to the head: both change alike
    elif not head_changes and embed_changes == {"full_weight"} and embed_replaces_shared_layer(adapter, layout, groups):
        tie = True
    elif head_changes == embed_changes:
        tie = bool(embed_head_equal)  # the same kinds of tensors on both sides: tied if equal
    else:
        tie = False
    if tie:
        return True, []
    return False, [f"{layout.head_module} and {module_leaf(layout.embed_module)} were tied in the base, but the adapter "
                   "changes them differently; the output is untied"]
