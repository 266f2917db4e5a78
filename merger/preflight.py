"""Sizes checked before memory is taken: what the chosen engine will hold against what the machine has."""

from __future__ import annotations

from .errors import MergerError


class InsufficientMemoryError(MergerError, MemoryError):
    """The merge would need more memory than the machine has; refused before allocating it."""


def check_memory(plan, engine: str) -> None:
    """Refuse a peft-engine merge that cannot fit in memory, with the numbers, before loading anything.

    The peft engine holds the whole model; without a GPU to spread it over (or with
    --device-map cpu) that is all in RAM. The estimate is the same one ``inspect`` shows.
    """
    if engine != "peft":
        return  # the stream engine holds a few row blocks whatever the model's size
    import torch

    from .logits import available_memory
    from .render import estimates, human_bytes

    options = plan.options
    if options.max_memory or (options.device_map != "cpu" and torch.cuda.is_available()):
        return  # placement over GPUs (or the user's limits) decides, and placement refuses what cannot fit
    need = max(estimates(plan)["peft_peak_ram_bytes"], output_bytes(plan))
    have = available_memory()
    if need > have:
        alternative = ("use --engine stream, which holds a few row blocks" if not plan.stream_blockers
                       else "use a machine with more memory or a GPU")
        raise InsufficientMemoryError(
            f"--engine peft: loading {plan.base.folder} and merging needs about {human_bytes(need)} of memory, "
            f"this machine has {human_bytes(have)} available; {alternative}")


def output_bytes(plan) -> int:
    from .tensors import numel

    per = 2 if plan.dtype in ("bfloat16", "float16") else 4
    return sum(numel(op.shape) * per for op in plan.ops)
