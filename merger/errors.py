"""The error family of merger.

Every error a user can cause is a :class:`MergerError`: its message is one line that says what
is wrong, where, what was found against what was expected, and what to do. Each class also
subclasses the builtin that fits, so ``except ValueError`` in a user's script keeps working.
The CLI maps ``exit_code`` to the process exit status and never shows a traceback unless asked.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_VALIDATION_FAILED = 1
EXIT_BAD_INPUT = 2


class MergerError(Exception):
    """Base of every error merger raises on purpose."""

    exit_code = EXIT_BAD_INPUT


class InputNotFoundError(MergerError, FileNotFoundError):
    """A folder or file the merge needs is not there."""


class AdapterError(MergerError, ValueError):
    """The adapter folder is not a usable PEFT adapter."""


class CheckpointError(MergerError, ValueError):
    """The base model folder is missing files or holds inconsistent ones."""


class IncompatibleError(MergerError, ValueError):
    """Adapter and base do not fit together (architecture, shapes, targets)."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        first = self.problems[0]
        more = len(self.problems) - 1
        # one line: the first (most telling) problem, and where to see the rest
        super().__init__(first if not more else f"{first} (and {more} more problems; merge-adapter inspect lists them)")


class InputFileError(MergerError, ValueError):
    """An input file (tokenizer, config, options file) is malformed."""


class UnsafeInputError(MergerError, PermissionError):
    """An input names a file outside its folder, or would run code without --trust-remote-code."""


class OutputLockedError(MergerError, BlockingIOError):
    """Another run holds OUT: two merges must never write one folder."""


class UnsupportedError(MergerError, NotImplementedError):
    """The adapter uses something merger cannot merge correctly; it refuses rather than guess."""


class OptionsError(MergerError, ValueError):
    """An option or config-file key is unknown or has a bad value."""


class OutputExistsError(MergerError, FileExistsError):
    """The output folder exists and is not empty, and overwrite was not asked for."""


class OutputError(MergerError, PermissionError):
    """OUT cannot be written where it was asked for (a file in the way, no permission, read-only)."""


class MissingDependencyError(MergerError, ImportError):
    """An optional extra a command needs is not installed (e.g. gguf: pip install 'merger[gguf]')."""


class ConverterError(MergerError, RuntimeError):
    """An external converter merger runs for the user (llama.cpp's convert_hf_to_gguf.py) failed."""


class ValidationFailedError(MergerError):
    """The merged checkpoint was written but failed validation; it was not committed."""

    exit_code = EXIT_VALIDATION_FAILED

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class HubPushError(MergerError, ConnectionError):
    """The merge was committed to OUT, but uploading it to the Hub failed; the message says how to retry."""

    result = None  # the MergeResult of the merge that stands (set by merge_adapter)
