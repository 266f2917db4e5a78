"""Where the peft engine puts the model: transformers' ``device_map="auto"``, computed up front.

Computing the map before loading lets merger refuse a placement it cannot merge correctly
before any weights are read: accelerate's disk offload. Measured here (transformers 5, PEFT
0.21, accelerate 1.15): with layers offloaded to disk, resizing the embedding loads the old
shape back over the new one, the unmerged model's logits are already wrong, and
``merge_and_unload`` leaves the disk copies unmerged, so the saved checkpoint is the base.
"""

from __future__ import annotations

from ..errors import UnsupportedError


def auto_device_map(model, max_memory: dict | None, dtype) -> dict:
    """transformers' 'auto' placement for ``model`` (built on the meta device); refuses disk."""
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    no_split = getattr(model, "_no_split_modules", None) or []
    balanced = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    device_map = infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=no_split, dtype=dtype)
    on_disk = [name or "the whole model" for name, device in device_map.items() if device == "disk"]
    if on_disk:
        from ..render import human_bytes

        limits = ", ".join(f"{k}={human_bytes(v)}" for k, v in balanced.items())
        modules = f"{len(on_disk)} module{'s' if len(on_disk) > 1 else ''}"
        raise UnsupportedError(
            f"--engine peft: the model does not fit in the memory it may use ({limits}); "
            f"{modules} ({', '.join(on_disk[:3])}{' ...' if len(on_disk) > 3 else ''}) would be offloaded to disk, "
            "where PEFT's merge is not written back; use --engine stream (its memory is about one tensor, whatever "
            "the model's size) or allow more memory with --max-memory"
        )
    return device_map
