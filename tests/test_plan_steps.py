"""plan_merge's steps, each on hand-written facts: no torch, no files, no model (ARCHITECTURE.md:
facts -> decisions, testable with shapes alone)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from merger.adapter import AdapterInfo
from merger.checkpoint import CheckpointInfo
from merger.keys import parse_adapter_key
from merger.layout import ModelLayout, ModuleMeta
from merger.options import MergeOptions
from merger.tensors import TensorMeta

H, V = 8, 10  # hidden size, base vocabulary


def layout(tied: bool = False) -> ModelLayout:
    modules = {"model.embed_tokens": ModuleMeta("embedding", (V, H)), "model.layers.0.q_proj": ModuleMeta("linear", (H, H)),
               "lm_head": ModuleMeta("linear", (V, H))}
    shapes = {f"{m}.weight": meta.weight_shape for m, meta in modules.items()}
    return ModelLayout("TinyForCausalLM", modules, shapes, "model.embed_tokens", "lm_head", tied, {k: k for k in shapes})


def base(tied: bool = False) -> CheckpointInfo:
    keys = ["model.embed_tokens.weight", "model.layers.0.q_proj.weight"] + ([] if tied else ["lm_head.weight"])
    shapes = {"model.embed_tokens.weight": (V, H), "model.layers.0.q_proj.weight": (H, H), "lm_head.weight": (V, H)}
    tensors = {k: TensorMeta(k, shapes[k], "F32", "model.safetensors") for k in keys}
    return CheckpointInfo(Path("/nowhere/base"), {"vocab_size": V, "tie_word_embeddings": tied}, "safetensors",
                          ("model.safetensors",), tensors, None, False)


def adapter(shapes: dict[str, tuple[int, ...]], **config) -> AdapterInfo:
    prefixed = {f"base_model.model.{k}": v for k, v in shapes.items()}
    tensors = {k: TensorMeta(k, v, "F32", "adapter_model.safetensors") for k, v in prefixed.items()}
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, **config}
    return AdapterInfo(Path("/nowhere/adapter"), config, "adapter_model.safetensors", tensors,
                       tuple(parse_adapter_key(k) for k in prefixed), None)


RESIZED = {"model.layers.0.q_proj.lora_A.weight": (2, H), "model.layers.0.q_proj.lora_B.weight": (H, 2),
           "model.embed_tokens.modules_to_save.weight": (16, H), "lm_head.modules_to_save.weight": (16, H)}


def test_grouping_puts_each_tensor_under_its_module_and_role():
    from merger.plan_groups import group_adapter_tensors

    groups = group_adapter_tensors(adapter(RESIZED, modules_to_save=["embed_tokens", "lm_head"]), layout())
    assert groups.roles("model.layers.0.q_proj") == {"lora_A": "base_model.model.model.layers.0.q_proj.lora_A.weight",
                                                    "lora_B": "base_model.model.model.layers.0.q_proj.lora_B.weight"}
    assert groups.roles("lm_head") == {"full_weight": "base_model.model.lm_head.modules_to_save.weight"}
    assert not groups.problems


def test_vocabulary_rows_come_from_the_adapter_tensors_and_the_tie_from_what_changed():
    from merger.plan_groups import group_adapter_tensors
    from merger.plan_vocab import decide_vocabulary

    info, lay = adapter(RESIZED, modules_to_save=["embed_tokens", "lm_head"]), layout(tied=True)
    vocab = decide_vocabulary(base(tied=True), info, lay, group_adapter_tensors(info, lay), MergeOptions(), embed_head_equal=False)
    assert (vocab.embed.rows, vocab.head.rows, vocab.tie) == (16, 16, False)
    assert "untied" in vocab.notes[0]


def test_ops_and_the_account_of_every_tensor():
    from merger.plan import plan_merge

    plan = plan_merge(base(), adapter(RESIZED, modules_to_save=["embed_tokens", "lm_head"]), layout(), MergeOptions())
    assert not plan.problems, plan.problems
    ops = {op.out_key: op for op in plan.ops}
    assert ops["model.layers.0.q_proj.weight"].lora.scale == 2.0  # alpha 4 / r 2
    assert ops["model.embed_tokens.weight"].replace_key.endswith("embed_tokens.modules_to_save.weight")
    assert ops["lm_head.weight"].shape == (16, H) and plan.config_edits["vocab_size"] == 16
    assert set(plan.adapter_usage) == {f"base_model.model.{k}" for k in RESIZED}


def test_an_unused_tensor_is_a_problem_not_a_silent_drop():
    from merger.plan import plan_merge

    extra = dict(RESIZED, **{"model.layers.0.q_proj.bias": (H,)})  # a bias the base's q_proj does not have
    plan = plan_merge(base(), adapter(extra, modules_to_save=["embed_tokens", "lm_head"]), layout(), MergeOptions())
    assert plan.problems == ("adapter tensors that would not be used: base_model.model.model.layers.0.q_proj.bias; "
                             "merger refuses to drop them",)


def test_a_stack_plans_each_stage_on_the_previous_output():
    import dataclasses

    from merger.plan import plan_merge
    from merger.stack import chain_stage, next_layout, stage_output

    first = plan_merge(base(), adapter(RESIZED, modules_to_save=["embed_tokens", "lm_head"]), layout(), MergeOptions())
    grown = {"model.embed_tokens.modules_to_save.weight": (24, H), "lm_head.modules_to_save.weight": (24, H)}
    second = plan_merge(stage_output(first), dataclasses.replace(adapter(grown, modules_to_save=["embed_tokens", "lm_head"]),
                                                                 folder=Path("/nowhere/sft")), next_layout(first), MergeOptions())
    chained = chain_stage(first, second, 2)
    assert [s.embed.rows for s in chained.stages] == [16, 24] and chained.embed.base_rows == 16
    assert stage_output(first).tensors["lm_head.weight"].shape == (16, H)
    shrunk = plan_merge(stage_output(chained), adapter(RESIZED, modules_to_save=["embed_tokens", "lm_head"]),
                        next_layout(chained), MergeOptions())
    assert any("was not trained on the previous stage" in p for p in chain_stage(chained, shrunk, 3).problems)


def test_planning_imports_no_torch():
    code = "import sys, merger.plan, merger.stack, merger.plan_experts, merger.drift; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
