"""What an earlier stage of a stack wrote, recomputed for validation.

The stream engine computes a stack block by block through its own readers; validation needs the
same tensors by another road: read through the safetensors library, each op applied to the
whole tensor with lora.py's pure functions, in float32. Used only for stacked plans (a single
adapter's base is read as it is stored); holds one tensor at a time.
"""

from __future__ import annotations


class ComputedStage:
    """``read(key)``: the output tensor ``key`` of ``plan``'s stage (its earlier stages included)."""

    def __init__(self, plan):
        from .engines.dequant_source import dequantized_reference
        from .validation_io import open_independently

        self.plan = plan
        self.ops = {op.out_key: op for op in plan.ops}
        if plan.previous is not None:
            self.source = ComputedStage(plan.previous)
        else:  # a quantized base as the dequantized model it stands for
            self.source = dequantized_reference(plan.base) or open_independently(plan.base.folder, plan.base.tensors)
        self.adapter = open_independently(plan.adapter.folder, plan.adapter.tensors)

    def exact(self, key: str) -> bool:
        """True when the tensor is the base's own bytes through every stage (a copy, cast aside)."""
        op = self.ops[key]
        if op.lora or op.expert or op.requantize or op.token_rows_key or op.replace_key or op.multiply != 1.0 or (op.shape and op.grow_from_rows not in (None, op.shape[0])):
            return False
        return not isinstance(self.source, ComputedStage) or self.source.exact(op.base_key)

    def read(self, key: str):
        import torch

        from .lora import dora_weight, embedding_delta, grow_rows, linear_delta

        op = self.ops[key]
        start = self.adapter.read(op.replace_key) if op.replace_key else self.source.read(op.base_key)
        if op.requantize:
            from .quantized import nf4_round_trip

            start = nf4_round_trip(start)
        if not start.is_floating_point() or not op.shape:
            return start
        weight = start.float()
        if weight.shape[0] != op.shape[0]:
            weight = grow_rows(weight, op.shape[0], self.plan.options.new_rows)
        if op.token_rows_key:
            values = self.adapter.read(op.token_rows_key).float()
            weight[list(op.token_indices)] = values
        if op.lora:
            a, b = self.adapter.read(op.lora.a_key).float(), self.adapter.read(op.lora.b_key).float()
            conv = op.lora.kind != "linear"
            delta = embedding_delta(a, b, op.lora.scale) if op.lora.kind == "embedding" else linear_delta(a, b, op.lora.scale, conv)
            if op.lora.magnitude_key:
                weight = dora_weight(weight, delta, self.adapter.read(op.lora.magnitude_key), fan_in_fan_out=conv)
            else:
                weight = weight + delta
        if op.expert:
            weight = weight + expert_update(op, self.adapter)
        if op.multiply != 1.0:
            weight = weight * op.multiply
        return weight.to(torch.float32)

    def close(self) -> None:
        self.source.close()
        self.adapter.close()


def expert_update(op, adapter):
    """The stacked-expert LoRA update on ``op``'s tensor, by PEFT's definition (ParamWrapper's einsum)."""
    import torch

    delta = op.expert
    a, b = adapter.read(delta.a_key).float(), adapter.read(delta.b_key).float()
    a3 = a.reshape(delta.experts, -1, a.shape[1])
    b3 = b.reshape(b.shape[0], -1, delta.experts)
    full = torch.einsum("ore,eri->eoi", b3, a3) * delta.scale  # (E, b, a): B_e @ A_e
    if not delta.b_first:
        full = full.transpose(1, 2)
    if delta.expert is None:
        return full
    return full[delta.expert, delta.row_offset:delta.row_offset + op.shape[0]]
