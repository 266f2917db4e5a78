"""Stacked adapters: a PT -> SFT -> DPO pipeline merged in one pass over the base.

Each stage was trained on the model the previous stage produced (its embedding the previous
rows plus what it added). So each stage is planned by the same torch-free steps as a single
adapter, against a *virtual* checkpoint: the previous stage's output, described from its plan
(shapes, dtype, edited config, the tokenizer it writes) without anything being written. The
last stage's plan carries the chain (``MergePlan.previous``); the engines execute the chain
in one read of the base and one write of OUT.
"""

from __future__ import annotations

import dataclasses

from .checkpoint import CheckpointInfo
from .metadata import written_tokenizer
from .outputs import merged_config
from .plan import MergePlan
from .tensors import SAFETENSORS_TAGS, TensorMeta

STAGE_FILE = "<previous stage>"  # the file name of a virtual checkpoint's tensors: never opened


def stage_output(plan: MergePlan) -> CheckpointInfo:
    """The checkpoint ``plan`` would write, as facts: what the next stage was trained on."""
    out_tag = SAFETENSORS_TAGS[plan.dtype]
    tensors = {}
    for op in plan.ops:
        source = plan.base.tensors[op.base_key] if op.base_key is not None else plan.adapter.tensors[op.replace_key]
        tensors[op.out_key] = TensorMeta(op.out_key, tuple(op.shape), out_tag if op.cast else source.dtype, STAGE_FILE)
    base = plan.base
    return CheckpointInfo(base.folder, merged_config(plan), base.format, base.files, tensors, written_tokenizer(plan),
                          base.has_generation_config, base.index_metadata)


def next_layout(plan: MergePlan):
    """The model layout of ``plan``'s output: the same modules, tied as the plan decided."""
    return dataclasses.replace(plan.layout, tied=plan.tie_word_embeddings)


def chain_stage(previous: MergePlan, stage: MergePlan, number: int) -> MergePlan:
    """``stage`` planned on ``previous``'s output: linked, with what only a stack can get wrong added."""
    problems = list(stage.problems)
    for decision, before in ((stage.embed, previous.embed), (stage.head, previous.head)):
        if decision is not None and before is not None and decision.rows < before.rows:
            problems.append(f"{stage_label(stage, number)}: its {decision.name} has {decision.rows} rows but stage "
                            f"{number - 1} made {before.rows}: it was not trained on the previous stage's merged model; "
                            "pass the stages in training order, each trained on the merge of those before it")
    tokenizer_reason = stage.tokenizer_reason
    if stage.adapter.tokenizer is None and stage.tokenizer_source is not None and stage.tokenizer_source != str(stage.base.folder):
        tokenizer_reason = f"stage {number} has no tokenizer, so the last stage's that has one is kept"
    return dataclasses.replace(stage, previous=previous, problems=tuple(problems), tokenizer_reason=tokenizer_reason)


def stage_label(plan: MergePlan, number: int) -> str:
    return f"stage {number} ({plan.adapter.folder.name})"
