"""merger: merge a PEFT LoRA adapter into its base model, resized vocabulary included.

Importing this package is cheap: torch, transformers and PEFT load only when a merge runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import (
    AdapterError,
    CheckpointError,
    HubPushError,
    IncompatibleError,
    InputNotFoundError,
    MergerError,
    OptionsError,
    OutputError,
    OutputExistsError,
    OutputLockedError,
    UnsafeInputError,
    UnsupportedError,
    ValidationFailedError,
)
from .options import MergeOptions

__version__ = "0.1.0"

__all__ = [
    "merge_adapter", "inspect_adapter", "validate_checkpoint", "repair_checkpoint", "merge_peft_model", "MergeAdapterCallback",
    "MergeOptions", "MergeResult",
    "MergerError", "AdapterError", "CheckpointError", "HubPushError", "IncompatibleError", "InputNotFoundError",
    "OptionsError", "OutputError", "OutputExistsError", "OutputLockedError", "UnsafeInputError", "UnsupportedError",
    "ValidationFailedError",
]

if TYPE_CHECKING:
    from .api import MergeResult, inspect_adapter, merge_adapter, repair_checkpoint, validate_checkpoint
    from .hooks import MergeAdapterCallback, merge_peft_model


def __getattr__(name: str):
    if name in ("merge_adapter", "inspect_adapter", "validate_checkpoint", "repair_checkpoint", "MergeResult"):
        from . import api

        return getattr(api, name)
    if name in ("merge_peft_model", "MergeAdapterCallback"):
        from . import hooks

        return getattr(hooks, name)
    raise AttributeError(f"module 'merger' has no attribute {name!r}")
