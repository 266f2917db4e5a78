"""Planning step 3: one TensorOp per output tensor, and the account of every adapter tensor.

Pure: the grouping and the vocabulary decisions in, the ops out. Each adapter tensor is
recorded in ``usage`` where it goes; a tensor claimed twice or never is a problem.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .adapter import AdapterInfo
from .checkpoint import CheckpointInfo
from .layout import ModelLayout
from .lora import lora_scale, pattern_value
from .plan_groups import AdapterGroups, token_indices
from .plan_rules import trained_on
from .plan_vocab import VocabularyPlan, embed_replaces_shared_layer
from .vocab import VocabDecision

FLOAT_TAGS = {"F32", "F16", "BF16", "F64"}


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
    # merged by PEFT itself: LoRA on this raw parameter (MergePlan.parameter_lora) or another PEFT
    # type's module (MergePlan.peft_merged)
    merged_by_peft: bool = False
    # the result multiplied by this last (before the cast): reproduces an older PEFT that skipped a
    # scaled embedding's factor in training (drift.ScaledEmbeddingDrift)
    multiply: float = 1.0
    expert: object | None = None  # plan_experts.ExpertDelta: a stacked-expert LoRA pair's update on this tensor
    # the start is first replaced by its round trip through this format (--merge-base nf4: what a QLoRA run trained on)
    requantize: str | None = None

    @property
    def parameter_lora(self) -> bool:  # the name before other PEFT types were merged
        return self.merged_by_peft

    @property
    def action(self) -> str:
        if self.lora or self.merged_by_peft or self.expert:
            return "lora-merged"
        if self.replace_key:
            return "replaced"
        if self.token_rows_key:
            return "rows-updated"
        if self.grow_from_rows is not None and self.grow_from_rows != self.shape[0]:
            return "resized"
        return "copied"


class OpBuilder:
    """Builds the ops of one merge; collects problems and the adapter tensors' usage as it goes."""

    def __init__(self, base: CheckpointInfo, adapter: AdapterInfo, layout: ModelLayout, groups: AdapterGroups,
                 vocab: VocabularyPlan, drift=None, expert_deltas: dict | None = None, merge_base: str = "original"):
        self.merge_base = merge_base
        self.base, self.adapter, self.layout, self.groups, self.vocab = base, adapter, layout, groups, vocab
        self.drift = drift  # drift.ScaledEmbeddingDrift, or None
        self.expert_deltas = expert_deltas or {}  # checkpoint key -> plan_experts.ExpertDelta
        self.usage = groups.usage
        self.problems: list[str] = []
        self.ops: list[TensorOp] = []
        self.seen_out: set[str] = set()

    def build(self) -> list[TensorOp]:
        layout, base, vocab = self.layout, self.base, self.vocab
        to_ckpt = layout.to_checkpoint_key()
        head_w = f"{layout.head_module}.weight" if layout.head_module else None
        targeted_params = tuple(self.adapter.config.get("target_parameters") or ())
        for ckpt_key, meta in base.tensors.items():
            model_key = layout.to_model_key.get(ckpt_key, ckpt_key)
            module, _, param = model_key.rpartition(".")
            if layout.tied and head_w and model_key == head_w:
                continue  # a stored copy of a tied head: written below only if the output unties
            own = ckpt_key[: -len(".weight")] if ckpt_key.endswith(".weight") else None
            if own in self.groups.checkpoint_modules:  # a per-expert Linear the adapter trained (older PEFT)
                module, param = own, "weight"
            op = self.make_op(ckpt_key, module, param, ckpt_key, meta.shape)
            if ckpt_key in self.expert_deltas:
                op = replace(op, expert=self.expert_deltas[ckpt_key])
            elif module in self.groups.parameter_lora and any(model_key == t or model_key.endswith("." + t) for t in targeted_params):
                op = replace(op, merged_by_peft=True)
            elif module in self.groups.peft_merged:
                op = replace(op, merged_by_peft=True)
            self.add(op)
        if layout.tied and layout.head_module:
            self.tied_head(to_ckpt, head_w)
        self.new_task_heads(to_ckpt)
        return self.ops

    def add(self, op: TensorOp) -> None:
        self.ops.append(op)
        self.seen_out.add(op.out_key)

    def tied_head(self, to_ckpt: dict, head_w: str) -> None:
        """The head of a tied base: its own tensor when the output unties, else its tensors are the embedding's."""
        layout, base = self.layout, self.base
        head_roles, embed_roles = self.groups.roles(layout.head_module), self.groups.roles(layout.embed_module)
        head_ckpt_key = to_ckpt.get(head_w)
        embed_ckpt_key = to_ckpt.get(f"{layout.embed_module}.weight") if layout.embed_module else None
        if not self.vocab.tie:
            out_key = head_ckpt_key or head_w
            start_key = head_ckpt_key if head_ckpt_key in base.tensors else embed_ckpt_key
            op = self.make_op(out_key, layout.head_module, "weight", start_key, base.tensors[start_key].shape)
            shared = (embed_roles.get("full_weight") if embed_replaces_shared_layer(self.adapter, layout, self.groups)
                      else embed_roles.get("original_weight"))
            if shared and not op.replace_key:
                # the head keeps the shared layer as PEFT's unmerged model has it: the replaced layer,
                # or the original module (with its resized rows) that the adapter saved
                op = replace(op, replace_key=shared, grow_from_rows=None,
                             shape=(self.adapter.tensors[shared].shape[0],) + tuple(op.shape[1:]))
            if self.drift is not None and self.drift.kind == "tokens" and "trainable_tokens" in embed_roles:
                # trained tied: the head computed with the embedding's token rows, unscaled
                op = replace(op, token_rows_key=embed_roles["trainable_tokens"],
                             token_indices=token_indices(self.adapter.config, layout.embed_module) or ())
            self.add(op)
        elif head_roles:
            # tied and staying tied: the head's own copies are the embedding's, accounted there
            for key in head_roles.values():
                if key not in self.usage:
                    self.usage[key] = "tied:" + (embed_ckpt_key or "")

    def new_task_heads(self, to_ckpt: dict) -> None:
        """Modules the base lacks: a new task head saved whole (e.g. a classifier's 'score')."""
        for module, roles in self.groups.by_module.items():
            if module in self.layout.modules and (f"{module}.weight" in to_ckpt or f"{module}.bias" in to_ckpt):
                continue
            for role, param in (("full_weight", "weight"), ("full_bias", "bias")):
                if role in roles and roles[role] not in self.usage:
                    out_key = f"{module}.{param}"
                    if out_key not in self.seen_out:
                        self.add(self.make_op(out_key, module, param, None, None))

    def use(self, keys, out_key: str) -> None:
        for k in keys:
            if k in self.usage:
                self.problems.append(f"{k}: used twice ({self.usage[k]} and {out_key})")
            self.usage[k] = out_key

    def vocab_for(self, module: str | None) -> VocabDecision | None:
        if module == self.layout.embed_module:
            return self.vocab.embed
        if module == self.layout.head_module:
            return self.vocab.head
        return None

    def make_op(self, out_key: str, module: str | None, param: str, base_key: str | None, base_shape) -> TensorOp:
        adapter = self.adapter
        roles = self.groups.roles(module)
        # a head's bias has one entry per vocabulary row (Phi, some GPT-2 variants): it grows with the head
        decision = self.vocab_for(module) if param == "weight" or (param == "bias" and module == self.layout.head_module) else None
        rows = decision.rows if decision else None
        shape = tuple(base_shape) if base_shape is not None else None
        replace_key = roles.get("full_weight" if param == "weight" else "full_bias")
        if replace_key:
            rshape = adapter.tensors[replace_key].shape
            if shape is not None and decision is None and tuple(rshape) != shape:
                self.problems.append(f"{replace_key}: shape {list(rshape)} does not match the base's {out_key} {list(shape)}: "
                                     f"the adapter was trained on another model; {trained_on(adapter)}")
            shape = tuple(rshape)
            self.use([replace_key], out_key)
        if rows is not None and shape is not None:
            shape = (rows,) + tuple(shape[1:])
        grow_from = base_shape[0] if decision is not None and not replace_key else None
        if "original_weight" in roles and param == "weight":
            self.use([roles["original_weight"]], "evidence")
        if "original_bias" in roles and param == "bias":
            self.use([roles["original_bias"]], "evidence")
        token_key, indices, lora = None, (), None
        if param == "weight":
            if "trainable_tokens" in roles:
                token_key = roles["trainable_tokens"]
                indices = token_indices(adapter.config, module) or ()
                tshape = adapter.tensors[token_key].shape
                if len(indices) != tshape[0] or (shape and tshape[1] != shape[1]):
                    self.problems.append(f"{token_key}: holds {list(tshape)} values for {len(indices)} token ids "
                                         f"{list(indices)[:6]}; the adapter config and weights disagree")
                elif shape and max(indices, default=0) >= shape[0]:
                    self.problems.append(f"{token_key}: token id {max(indices)} is past the {shape[0]} rows of {module}")
                self.use([token_key], out_key)
            lora = self.lora_for(module, roles, rows) if module else None
        elif "lora_B_bias" in roles:
            self.problems.append(f"{roles['lora_B_bias']}: LoRA bias (lora_bias=True) is not supported yet")
        multiply = 1.0
        if self.drift is not None and module == self.layout.embed_module and param == "weight":
            if self.drift.kind == "lora" and lora is not None:
                lora = replace(lora, scale=lora.scale / self.drift.scale)
            elif self.drift.kind == "tokens":
                multiply = 1.0 / self.drift.scale
        return TensorOp(out_key, shape, base_key, replace_key, grow_from, token_key, tuple(indices), lora,
                        cast=base_key is None or self.base.tensors[base_key].dtype in FLOAT_TAGS, multiply=multiply,
                        requantize=self.requantized(module, param, replace_key))

    def requantized(self, module: str | None, param: str, replace_key: str | None) -> str | None:
        """With --merge-base nf4, the weights bitsandbytes quantized for QLoRA: every Linear but the head."""
        if self.merge_base != "nf4" or param != "weight" or replace_key or module is None or module == self.layout.head_module:
            return None
        meta = self.layout.modules.get(module)
        linear = (meta is not None and meta.kind == "linear") or module in self.groups.checkpoint_modules
        return "nf4" if linear else None

    def lora_for(self, module: str, roles: dict[str, str], target_rows: int | None) -> LoraDelta | None:
        adapter, config = self.adapter, self.adapter.config
        meta = self.layout.modules.get(module)
        if meta is None and module in self.groups.checkpoint_modules:
            from .layout import ModuleMeta

            meta = ModuleMeta("linear", tuple(self.base.tensors[module + ".weight"].shape))
        if "lora_A" in roles and "lora_B" in roles:
            a_key, b_key = roles["lora_A"], roles["lora_B"]
            kind = meta.kind if meta else "other"
        elif "lora_embedding_A" in roles and "lora_embedding_B" in roles:
            a_key, b_key, kind = roles["lora_embedding_A"], roles["lora_embedding_B"], "embedding"
        else:
            for role in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
                if role in roles:
                    self.problems.append(f"{roles[role]}: its LoRA partner is missing from the adapter file; re-save the adapter")
            return None
        if kind not in ("linear", "conv1d", "embedding"):
            self.problems.append(f"{a_key}: LoRA on a {kind} module ({module}) is not supported; only Linear, Conv1D and Embedding")
            return None
        # A is (r, columns A reads), B is (rows B writes, r); which base dimension each is depends on the layer
        rows, cols = meta.weight_shape
        a_cols, b_rows = {"linear": (cols, rows), "conv1d": (rows, cols), "embedding": (rows, cols)}[kind]
        if target_rows is not None:  # a resized embedding or head
            a_cols, b_rows = (target_rows, b_rows) if kind == "embedding" else (a_cols, target_rows)
        a, b = adapter.tensors[a_key], adapter.tensors[b_key]
        if len(a.shape) != 2 or len(b.shape) != 2:
            self.problems.append(f"{module}: LoRA A {list(a.shape)} / B {list(b.shape)} are not matrices, as PEFT saves them for a "
                                 f"{kind} layer; the adapter file is corrupt or from another tool: re-save the adapter")
            return None
        if a.shape[1] != a_cols or b.shape[0] != b_rows or a.shape[0] != b.shape[1]:
            self.problems.append(
                f"{module}: {'lora_embedding_A' if kind == 'embedding' else 'lora_A'} {list(a.shape)} / B {list(b.shape)} "
                f"do not fit the base weight {list(meta.weight_shape)} (A needs {a_cols} columns, B {b_rows} rows): "
                f"the adapter was trained on another architecture or size; {trained_on(adapter)}"
            )
            return None
        alpha = pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
        rank = pattern_value(config.get("rank_pattern"), module, config.get("r", 8)) or a.shape[0]
        if a.shape[0] != rank:  # PEFT would refuse to load it; its scale alpha/r would be wrong here
            self.problems.append(f"{a_key}: rank {a.shape[0]} but adapter_config.json gives this module r={rank} "
                                 "(r, or its rank_pattern entry): the config and the weights disagree; re-save the adapter")
            return None
        magnitude = roles.get("lora_magnitude")
        self.use([a_key, b_key] + ([magnitude] if magnitude else []), module)
        return LoraDelta(a_key, b_key, lora_scale(alpha, rank, adapter.use_rslora), kind, magnitude)


def unused_adapter_tensors(adapter: AdapterInfo, usage: dict[str, str]) -> list[str]:
    return [k.key for k in adapter.keys if k.key not in usage]
