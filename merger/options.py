"""MergeOptions: the one definition of every merge option.

The CLI flags, the YAML config-file keys and the keyword arguments of :func:`merger.merge_adapter`
are all generated from the fields below, so they cannot drift apart. Precedence: defaults <
config file < explicit flags or keyword arguments.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import OptionsError
from .inputs import short

DTYPES = ("auto", "float32", "bfloat16", "float16")
MAX_CONFIG_BYTES = 1 << 20


def _opt(default, help: str, choices: tuple | None = None, metavar: str | None = None):
    return field(default=default, metadata={"help": help, "choices": choices, "metavar": metavar})


@dataclass(frozen=True)
class MergeOptions:
    engine: str = _opt(
        "auto",
        "merge engine: 'stream' reads and writes one tensor at a time (low memory), 'peft' loads "
        "the model with transformers+PEFT and calls merge_and_unload; 'auto' picks stream when it "
        "supports the plan, else peft",
        ("auto", "stream", "peft"),
    )
    dtype: str = _opt(
        "auto", "dtype of the written weights; 'auto' keeps the base checkpoint's dtype", DTYPES
    )
    device: str = _opt(
        "auto",
        "where the stream engine does its arithmetic: 'auto' (first GPU if any, else cpu), 'cpu', "
        "'cuda' or 'cuda:N'",
        metavar="DEVICE",
    )
    device_map: str = _opt(
        "auto",
        "accelerate device map for the peft engine: 'auto' (GPUs when present, else cpu), 'cpu' "
        "or 'cuda:N'",
        metavar="MAP",
    )
    max_memory: str | None = _opt(
        None,
        "per-device memory limits for the peft engine's device map (auto), e.g. '0=20GiB,cpu=60GiB'; "
        "a model that would not fit is refused up front (disk offload is not merged correctly by PEFT)",
        metavar="LIMITS",
    )
    max_shard_size: str = _opt("5GB", "largest output shard, e.g. 5GB, 500MB", metavar="SIZE")
    tokenizer: str = _opt(
        "auto",
        "tokenizer written to OUT: 'auto' (the adapter's when it has one, else the base's), "
        "'adapter', 'base', or a folder",
        metavar="SOURCE",
    )
    pad_to_multiple_of: int | None = _opt(
        None,
        "only when the adapter's tensors do not fix the vocabulary rows: grow to the tokenizer "
        "length rounded up to this multiple (what training passed to resize_token_embeddings)",
        metavar="N",
    )
    new_rows: str = _opt(
        "mean",
        "value of grown rows the adapter never trained: 'mean' of the base's rows (what "
        "transformers' mean resizing does on average, without its random noise) or 'zeros'",
        ("mean", "zeros"),
    )
    merge_base: str = _opt(
        "original",
        "the base the LoRA deltas are added to: 'original' (the checkpoint's weights) or 'nf4' (each Linear "
        "weight as bitsandbytes' NF4 stored it for a QLoRA run, dequant(nf4(W)), as axolotl merges; needs "
        "the nf4 extra)",
        ("original", "nf4"),
    )
    validate: str = _opt(
        "fast",
        "check OUT after writing: 'fast' re-reads every tensor and checks sampled merged modules "
        "numerically; 'full' also compares logits with base+unmerged adapter; 'off' skips",
        ("off", "fast", "full"),
    )
    overwrite: bool = _opt(False, "replace a non-empty OUT (it is replaced only after success)")
    residual_base: bool = _opt(
        False,
        "the base given is the residual model a PiSSA/OLoRA/CorDA/LoRA-GA/LoftQ adapter saved without "
        "conversion was trained on (PEFT rewrote the base when training started); merge into it as it is",
    )
    initial_adapter: str | None = _opt(
        None,
        "the adapter a PiSSA-family init saved before training (LLaMA-Factory's pissa_init/): merger "
        "applies PEFT's conversion (dW = B·A - B0·A0) so the unconverted adapter merges into the original base",
        metavar="DIR",
    )
    trust_remote_code: bool = _opt(
        False, "allow the model's own code from the base folder (peft engine only)"
    )
    push_to_hub: str | None = _opt(
        None,
        "after the validated merge is committed, upload OUT to this Hub model repo (owner/name), created "
        "when missing; the token is huggingface_hub's (HF_TOKEN or `hf auth login`)",
        metavar="REPO",
    )
    private: bool = _opt(False, "with push_to_hub: create the repo private (an existing repo keeps its visibility)")
    revision: str | None = _opt(
        None, "with push_to_hub: the branch to push to, created from main when missing (default: main)", metavar="BRANCH"
    )
    create_pr: bool = _opt(False, "with push_to_hub: open a pull request instead of committing to the branch")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            _check_type(f, getattr(self, f.name))
            value = getattr(self, f.name)
            if isinstance(value, str) and any(not c.isprintable() for c in value):
                raise OptionsError(f"option {f.name}: {short(value)} holds control characters; write the value out plainly")
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise OptionsError(
                    f"option {f.name}: {short(value)} is not one of {', '.join(choices)}"
                )
        if self.pad_to_multiple_of is not None and not 1 <= self.pad_to_multiple_of <= 65536:
            raise OptionsError(
                f"option pad_to_multiple_of: {short(self.pad_to_multiple_of)} is not a positive integer up to 65536"
            )
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise OptionsError(
                f"option device: {short(self.device)} is not auto, cpu, cuda or cuda:N"
            )
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device_map):
            raise OptionsError(
                f"option device_map: {short(self.device_map)} is not auto, cpu, cuda or cuda:N"
            )
        if self.max_memory and self.device_map != "auto":
            raise OptionsError(
                f"option max_memory: it limits --device-map auto, not {short(self.device_map)}; "
                "drop it or use --device-map auto"
            )
        parse_max_memory(self.max_memory)
        _check_push(self)
        if self.residual_base and self.initial_adapter:
            raise OptionsError("options residual_base and initial_adapter: give one; --residual-base says the base already is "
                               "the rewritten one, --initial-adapter converts the adapter to fit the original base")
        if parse_size(self.max_shard_size) <= 0:
            raise OptionsError(f"option max_shard_size: {short(self.max_shard_size)} is not a positive size like 5GB or 500MB")

    @classmethod
    def from_mapping(cls, values: dict[str, Any], source: str = "options") -> "MergeOptions":
        """Build options from a dict (config file or kwargs), rejecting unknown keys by name."""
        return cls().merged_with(values, source)

    def merged_with(self, values: dict[str, Any], source: str) -> "MergeOptions":
        """These options with ``values`` on top, unknown keys refused by name."""
        known = {f.name for f in dataclasses.fields(self)}
        odd = next((k for k in values if not isinstance(k, str)), None)
        if odd is not None or any(k is None for k in values):
            raise OptionsError(f"{source}: {short(odd)} is not an option name; options are names like dtype or engine")
        normalized = {k.replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(normalized) - known)
        if unknown:
            raise OptionsError(
                f"{source}: unknown option {', '.join(short(k, 40) for k in unknown[:3])}; "
                f"known options are {', '.join(sorted(known))}"
            )
        for key, value in normalized.items():
            if value is False and "off" in (_field(key).metadata.get("choices") or ()):
                normalized[key] = "off"  # YAML 1.1 reads a bare `off` as false
        return dataclasses.replace(self, **normalized)

    def replace(self, **changes) -> "MergeOptions":
        return dataclasses.replace(self, **changes)


# a Hub model repo id as huggingface_hub's validate_repo_id accepts it, the owner required
_REPO_PART = r"\w(?:[\w.-]{0,94}\w)?"
_REPO_ID = re.compile(rf"{_REPO_PART}/{_REPO_PART}", re.ASCII)
_BRANCH = re.compile(r"\w(?:[\w./-]{0,198}\w)?", re.ASCII)


def _check_push(options: "MergeOptions") -> None:
    repo, branch = options.push_to_hub, options.revision
    if repo is None:
        given = [name for name in ("private", "revision", "create_pr") if getattr(options, name) not in (None, False)]
        if given:
            raise OptionsError(f"option {given[0]}: only applies to a push to the Hub; add --push-to-hub OWNER/NAME "
                               f"or drop --{given[0].replace('_', '-')}")
        return
    if not _REPO_ID.fullmatch(repo) or "--" in repo or ".." in repo or repo.endswith(".git"):
        raise OptionsError(f"option push_to_hub: {short(repo)} is not a Hub repo id; expected owner/name (letters, "
                           "digits, - _ . and no -- or ..), e.g. my-user/llama-merged")
    if branch is not None and (not _BRANCH.fullmatch(branch) or ".." in branch or "//" in branch):
        raise OptionsError(f"option revision: {short(branch)} is not a branch name; use letters, digits and - _ . /, "
                           "e.g. merged or refs/pr/3")


def _field(name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(MergeOptions) if f.name == name)


def _check_type(f: dataclasses.Field, value) -> None:
    """Values of the declared type only: a YAML "false" is a string, and a string is truthy."""
    kind = str(f.type)
    if kind == "bool":
        ok = isinstance(value, bool)
        want = "true or false"
    elif "int" in kind:
        ok = (value is None and "None" in kind) or (isinstance(value, int) and not isinstance(value, bool))
        want = "a positive integer"
    elif f.name == "max_shard_size":
        ok = isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))
        want = "a size like 5GB or 500MB"
    else:
        ok = isinstance(value, str) or (value is None and "None" in kind)
        want = "a string"
    if not ok:
        raise OptionsError(f"option {f.name}: {short(value)} is not {want}")


def option_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(MergeOptions))


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML preset: a mapping of option names to values."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise OptionsError(f"config file {path}: not found")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise OptionsError(f"config file {path}: {path.stat().st_size} bytes; an options file is a few lines (at most {MAX_CONFIG_BYTES} bytes)")
    try:
        text = path.read_text(encoding="utf-8")
        # anchors and aliases let a few lines expand into billions of values ("billion laughs");
        # options files have no use for them
        if any(isinstance(t, (yaml.AnchorToken, yaml.AliasToken)) for t in yaml.scan(text)):
            raise OptionsError(f"config file {path}: uses YAML anchors or aliases (& or *); write each option's value out")
        data = yaml.safe_load(text) or {}
    except UnicodeDecodeError:
        raise OptionsError(f"config file {path}: not UTF-8 text; an options file is plain YAML") from None
    except OptionsError:
        raise
    except ValueError as exc:  # a number past Python's digit limit, raised while constructing it
        raise OptionsError(f"config file {path}: holds a value merger cannot read ({short(str(exc))}); fix the file") from None
    except RecursionError:
        raise OptionsError(f"config file {path}: nests too deep for an options file; it maps option names to values") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise OptionsError(f"config file {path}: not valid YAML{where} ({problem}); fix the file") from None
    if not isinstance(data, dict):
        raise OptionsError(f"config file {path}: expected a mapping of option: value, found {type(data).__name__}")
    return data


def parse_max_memory(text: str | None) -> dict[int | str, int] | None:
    """'0=20GiB,cpu=60GiB' -> {0: 21474836480, 'cpu': 64424509440}: accelerate's max_memory."""
    if not text:
        return None
    limits: dict[int | str, int] = {}
    for part in str(text).split(","):
        device, _, amount = (s.strip() for s in part.partition("="))
        if not re.fullmatch(r"\d+|cpu|cuda:\d+|mps|xpu:\d+", device) or not amount:
            raise OptionsError(
                f"option max_memory: {short(part.strip())} in {short(text)} is not DEVICE=SIZE; "
                "write GPU indices and cpu, e.g. 0=20GiB,cpu=60GiB"
            )
        limits[int(device) if device.isdigit() else device] = parse_size(amount, "max_memory")
    return limits


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


def parse_size(text: str | int, option: str = "max_shard_size") -> int:
    """'5GB' -> 5_000_000_000 bytes, '500MiB' -> 524_288_000; ints pass through."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise OptionsError(f"option {option}: {short(text)} is not a size like 5GB or 500MB")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    power = " KMGT".index(unit.upper() or " ")
    size = float(number) * base**power
    if not size < 2**63:  # also catches inf from a thousand-digit number
        raise OptionsError(f"option {option}: {short(text)} is larger than any disk")
    return int(size)
