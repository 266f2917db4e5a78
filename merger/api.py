"""The one orchestration function behind the CLI, the notebook API and the training hooks."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .commit import check_free_space, check_no_overlap, check_output_target, make_parent, promote, recover_leftovers, staging_folder
from .errors import HubPushError, IncompatibleError, InputFileError, MergerError, OptionsError, OutputError, ValidationFailedError
from .lock import output_lock
from .facts import gather_facts
from .hub import HubPush, push_folder
from .metadata import plan_output_files
from .options import MergeOptions
from .preflight import check_memory, output_bytes
from .plan import MergePlan, plan_merge
from .sources import check_tokenizer_source, resolve_base, resolve_folder, trainer_folder
from .validate import ValidationReport, validate_output

log = logging.getLogger(__name__)


@dataclass
class MergeResult:
    out: Path
    engine: str
    engine_reason: str
    plan: MergePlan
    validation: ValidationReport
    seconds: float
    size_bytes: int
    files: list[str] = field(default_factory=list)
    hub: HubPush | None = None  # where OUT was pushed, with push_to_hub

    def summary(self) -> str:
        from .render import human_bytes

        return (f"merged into {self.out} ({human_bytes(self.size_bytes)}, {len(self.files)} weight files) in "
                f"{self.seconds:.1f}s with the {self.engine} engine; {self.validation.summary()}"
                + (f"; {self.hub.summary()}" if self.hub else ""))

    def __repr__(self) -> str:
        from .render import report_text

        lines = [self.summary()] + [f"  {s}" for s in self.plan.stories] + report_text(self.validation).splitlines()[1:]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        from .render import html_block

        return html_block("merged" if self.validation.ok else "merge FAILED validation", repr(self))


def _options(options: MergeOptions | None, overrides: dict) -> MergeOptions:
    """Keyword overrides on top of an options object (or the defaults); unknown names are refused."""
    if options is not None and not isinstance(options, MergeOptions):
        raise OptionsError(f"options: expected a MergeOptions, found {type(options).__name__}; pass options as keyword arguments instead")
    base = options or MergeOptions()
    return base.merged_with(overrides, "merge_adapter()") if overrides else base


def inspect_adapter(base: str | os.PathLike | None, adapter, options: MergeOptions | None = None, **overrides) -> MergePlan:
    """Read the folders and decide the whole merge, writing nothing. Returns the MergePlan.

    ``adapter`` is one adapter folder, or a list of them: stages trained one on the merge of the
    last (PT, SFT, DPO), merged in order; the plan returned is the last stage's, chained to the rest.
    With ``initial_adapter``, the converted adapter lives in a scratch folder as long as the plan.
    """
    import weakref

    workspace = Workspace(None)
    plan = _inspect(base, adapter, _options(options, overrides), workspace)
    if workspace.path is not None:
        weakref.finalize(plan, workspace.remove)
    return plan


class Workspace:
    """A scratch folder made on first use (a converted adapter), inside ``parent`` (OUT's, for a merge)."""

    def __init__(self, parent: Path | None, prefix: str = "merger-scratch-"):
        self.parent, self.prefix, self.path = parent, prefix, None

    def folder(self, name: str) -> Path:
        import tempfile

        if self.path is None:
            self.path = Path(tempfile.mkdtemp(prefix=self.prefix, dir=self.parent))
        return self.path / name

    def remove(self) -> None:
        import shutil

        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None


def _inspect(base, adapter, opts: MergeOptions, workspace: Workspace) -> MergePlan:
    check_tokenizer_source(opts.tokenizer)
    sources = adapter_sources(adapter)
    adapter_dirs = stage_folders(sources)
    base_dir = resolve_base(base, adapter_dirs[0])
    plan = None
    adapter_dirs = convert_initialized(sources, adapter_dirs, opts, workspace)
    for number, (source, adapter_dir) in enumerate(zip(sources, adapter_dirs, strict=True), 1):
        plan = _plan_stage(plan, base_dir, source, adapter_dir, opts, number, len(sources), workspace)
    if opts.tokenizer == "adapter" and len(sources) > 1 and not any(stage.adapter.tokenizer for stage in plan.stages):
        from .errors import IncompatibleError as _Incompatible

        raise _Incompatible(f"--tokenizer adapter was asked for but none of the {len(sources)} adapter folders has tokenizer files")
    return dataclasses.replace(plan, outputs=plan_output_files(plan))


def adapter_sources(adapter) -> list:
    """The adapter argument as a list of stages: one folder, or several in training order."""
    if isinstance(adapter, (list, tuple)):
        if not adapter:
            raise OptionsError("adapter: an empty list; pass one adapter folder, or the stages of a pipeline in training order")
        return list(adapter)
    return [adapter]


def convert_initialized(sources: list, adapter_dirs: list[Path], opts: MergeOptions, workspace: Workspace) -> list[Path]:
    """With --initial-adapter, the one stage saved unconverted by a PiSSA-family init, converted (adapter_conversion.py)."""
    if not opts.initial_adapter:
        return adapter_dirs
    from .adapter import read_adapter_config
    from .adapter_conversion import convert_with_initial, mutating_init

    initial = resolve_folder(opts.initial_adapter, "initial_adapter")
    mutated = [i for i, folder in enumerate(adapter_dirs) if mutating_init(read_adapter_config(folder))]
    if len(mutated) != 1:
        found = "none of the adapters" if not mutated else f"{len(mutated)} stages"
        raise OptionsError(f"--initial-adapter {initial}: {found} saved with a base-rewriting init (init_lora_weights pissa, "
                           "olora, corda, lora_ga, loftq); it converts exactly one: "
                           + ("drop --initial-adapter" if not mutated else "merge those stages one at a time"))
    index = mutated[0]
    source_dir = adapter_dirs[index]
    trainer = trainer_folder(sources[index], source_dir)
    converted = convert_with_initial(source_dir, initial, workspace.folder(source_dir.name), trainer)
    log.info("%s: converted with the initial adapter %s (dW = B·A - B0·A0, PEFT's conversion)", source_dir, initial)
    return adapter_dirs[:index] + [converted] + adapter_dirs[index + 1:]


def stage_folders(sources: list) -> list[Path]:
    """The adapter folders, each at most once: a stage given twice would apply its update twice."""
    folders = [resolve_folder(source, "adapter") for source in sources]
    seen: dict[Path, int] = {}
    for number, folder in enumerate(folders, 1):
        earlier = seen.setdefault(folder.resolve(), number)
        if earlier != number:
            raise OptionsError(f"--adapter {folder}: given twice (stages {earlier} and {number}); each stage of a pipeline "
                               "is merged once, in training order: pass each adapter folder once")
    return folders


def _plan_stage(previous: MergePlan | None, base_dir: Path, source, adapter_dir: Path, opts: MergeOptions,
                number: int, count: int, workspace: Workspace) -> MergePlan:
    """One stage's plan: on the base for the first, on the previous stage's output for the rest."""
    from .adapter import inspect_adapter_folder
    from .facts import embed_head_equal, non_finite_tensors
    from .stack import chain_stage, next_layout, stage_label, stage_output

    stage_opts = opts
    if count > 1 and opts.tokenizer == "adapter":
        stage_opts = opts.replace(tokenizer="auto")  # the last stage's that has one: checked over the whole stack
    if previous is not None and opts.residual_base:
        stage_opts = stage_opts.replace(residual_base=False)  # the residual is of the base: only the first stage's
    if previous is None:
        facts = gather_facts(base_dir, adapter_dir, opts.trust_remote_code, trainer_folder(source, adapter_dir))
        base, adapter_facts, layout, non_finite, equal = facts.base, facts.adapter, facts.layout, facts.non_finite, facts.embed_head_equal
    else:
        adapter_facts = inspect_adapter_folder(adapter_dir, base_dir, trainer_folder(source, adapter_dir))
        base, layout, non_finite = stage_output(previous), next_layout(previous), non_finite_tensors(adapter_facts)
        equal = embed_head_equal(adapter_facts, layout)
    drifted, drift_notes, drift_problems = _drift(adapter_facts, layout, source, base_dir, workspace)
    if drifted is not adapter_facts:
        adapter_facts, equal = drifted, embed_head_equal(drifted, layout)
    plan = plan_merge(base, adapter_facts, layout, stage_opts, equal, intermediate=number < count)
    plan = dataclasses.replace(plan, notes=tuple(drift_notes) + plan.notes, problems=tuple(drift_problems) + plan.problems)
    if non_finite:  # first: nothing else about a diverged adapter matters
        names = ", ".join(non_finite[:3]) + (f" and {len(non_finite) - 3} more" if len(non_finite) > 3 else "")
        problem = (f"{adapter_dir / adapter_facts.weights_file}: {names} hold NaN or Inf values (training diverged or the save "
                   "is corrupt); merging would write them into the model: use an earlier checkpoint of the adapter")
        plan = dataclasses.replace(plan, problems=(problem,) + plan.problems)
    if count > 1:
        label = stage_label(plan, number)
        plan = dataclasses.replace(plan, problems=tuple(f"{label}: {p}" for p in plan.problems),
                                   notes=tuple(f"{label}: {n}" for n in plan.notes))
    if previous is not None:
        plan = chain_stage(previous, plan, number)
        plan = dataclasses.replace(plan, problems=previous.problems + plan.problems, notes=previous.notes + plan.notes)
    return plan


def _drift(adapter, layout, source, base_dir: Path, workspace: Workspace):
    """The adapter as today's PEFT reads it (rewritten into scratch where an older PEFT saved it
    otherwise), with what was done said, or the refusal (drift.py)."""
    from .adapter import inspect_adapter_folder
    from .adapter_conversion import regrouped_expert_adapter
    from .drift import expert_orientation, version_label
    from .plan_groups import parameter_lora_owner

    owners = {k.key: owner for k in adapter.keys if (owner := parameter_lora_owner(k, layout, adapter.config))}
    old, refusal = expert_orientation(adapter, layout, owners) if owners else ([], None)
    if refusal:
        return adapter, [], [refusal]
    if not old:
        return adapter, [], []
    target = workspace.folder(f"{adapter.folder.name}-experts-regrouped")
    regrouped_expert_adapter(adapter.folder, old, target, trainer_folder(source, adapter.folder))
    note = (f"{adapter.folder}: {version_label(adapter.config)}: its LoRA on {len(old)} stacked expert parameters "
            f"(e.g. {old[0].parameter}) is in the orientation PEFT before 0.19.1 saved (peft #3165), as their shapes show; "
            "regrouped into today's orientation, the same update")
    return inspect_adapter_folder(target, base_dir, trainer_folder(source, adapter.folder)), [note], []


def choose_engine(plan: MergePlan) -> tuple[str, str]:
    from .engines.stream import stream_blockers

    requested = plan.options.engine
    blockers = stream_blockers(plan)
    if plan.peft_blockers and (requested == "peft" or blockers):
        from .errors import UnsupportedError

        also = f"; and the stream engine cannot run it ({'; '.join(blockers)})" if blockers else "; use --engine stream or auto"
        raise UnsupportedError(f"--engine peft cannot run this merge ({'; '.join(plan.peft_blockers)}){also}")
    if requested == "peft":
        return "peft", "asked for with --engine peft"
    if requested == "stream":
        if blockers:
            from .errors import UnsupportedError

            raise UnsupportedError(f"--engine stream cannot run this merge ({'; '.join(blockers)}); use --engine peft or auto")
        return "stream", "asked for with --engine stream"
    if blockers:
        return "peft", f"stream engine cannot run it ({'; '.join(blockers)})"
    return "stream", "the plan is fully supported by the streaming engine (lowest memory)"


def merge_adapter(base: str | os.PathLike | None, adapter: str | os.PathLike, out: str | os.PathLike,
                  options: MergeOptions | None = None, *, quiet: bool = False, **overrides) -> MergeResult:
    """Merge ``adapter`` into ``base`` and write a proven checkpoint to ``out``.

    ``base`` may be None: then the adapter's recorded base_model_name_or_path is used.
    Keyword arguments are MergeOptions fields (engine, dtype, validate, overwrite, ...). Raises a
    MergerError subclass with a one-line message for bad input, ValidationFailedError (OUT left
    untouched) when the written checkpoint fails validation. With ``push_to_hub="owner/name"`` the
    committed OUT is then uploaded (``result.hub``); a failed upload raises HubPushError, whose
    ``result`` is the merge that stands.
    """
    started = time.monotonic()
    opts = _options(options, overrides)
    if not str(out).strip():
        raise OptionsError("--out is empty; pass the folder to write the merged model to")
    out = Path(out).expanduser()
    adapter_dirs = stage_folders(adapter_sources(adapter))
    base_dir = resolve_base(base, adapter_dirs[0])
    check_no_overlap(out, input_folders(base_dir, adapter_dirs, opts))
    make_parent(out)
    from .report import InputHasher

    try:
        with output_lock(out):
            recovered = recover_leftovers(out)
            check_output_target(out, opts.overwrite)
            # hashing the inputs for the report runs beside the planning: hashlib releases the GIL, and
            # planning is mostly the single-threaded import of transformers
            roles = {**adapter_roles(adapter_dirs), "base": base_dir}
            if opts.initial_adapter:
                roles["initial adapter"] = resolve_folder(opts.initial_adapter, "initial_adapter")
            # a converted adapter is scratch beside OUT (same disk), gone when the merge ends however it ends
            workspace = Workspace(out.resolve().parent, prefix=f".{out.resolve().name}.tmp-convert-")
            try:
                with InputHasher(roles) as hasher:
                    result = _merge_planned(base_dir, adapter, out, opts, hasher, started, quiet, recovered, workspace)
            finally:
                workspace.remove()
            if opts.push_to_hub:  # only a validated, committed OUT is pushed, still under OUT's lock
                try:
                    result.hub = push_folder(result.out, opts)
                except HubPushError as exc:
                    exc.result = result  # the merge stands: a caller such as the training hook keeps it
                    raise
            return result
    except MergerError:
        raise
    except OSError as exc:  # the disk filled, a file vanished or turned unreadable mid-merge
        raise os_error_message(exc, out) from exc


def adapter_roles(adapter_dirs: list[Path]) -> dict[str, Path]:
    """The adapter folders by the name the report gives them: 'adapter', or 'stage N adapter' in a stack."""
    if len(adapter_dirs) == 1:
        return {"adapter": adapter_dirs[0]}
    return {f"stage {i} adapter": folder for i, folder in enumerate(adapter_dirs, 1)}


def input_folders(base_dir: Path, adapter_dirs: list[Path], opts: MergeOptions) -> dict[str, Path]:
    """Every input folder by its flag: OUT may overlap none of them."""
    folders = {"--base": base_dir}
    for i, folder in enumerate(adapter_dirs, 1):
        folders["--adapter" if len(adapter_dirs) == 1 else f"--adapter (stage {i})"] = folder
    if opts.tokenizer not in ("auto", "adapter", "base"):
        folders["--tokenizer"] = Path(opts.tokenizer).expanduser()
    if opts.initial_adapter:
        folders["--initial-adapter"] = Path(opts.initial_adapter).expanduser()
    return folders


def os_error_message(exc: OSError, out: Path) -> MergerError:
    """A system error during a merge as one line: which file, what happened, what to do. Nothing was committed."""
    import errno

    name = exc.filename2 or exc.filename or "a file"  # a copy's filename2 is the file it was writing
    staging = str(out.resolve().parent / f".{out.resolve().name}.")
    writing = str(name).startswith(staging) or str(name).startswith(str(out.resolve()))
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(f"--out {out}: the disk filled up while writing {name}; nothing was committed and the partial "
                           "files were removed: free space or choose another disk")
    if writing:
        return OutputError(f"--out {out}: cannot write {name} ({exc.strerror or type(exc).__name__}); nothing was committed: "
                           "choose a folder you can write to")
    return InputFileError(f"{name}: cannot be read ({exc.strerror or type(exc).__name__}); nothing was written: "
                          "check that the file is there and readable")


def _merge_planned(base_dir: Path, adapter, out: Path, opts: MergeOptions, hasher,
                   started: float, quiet: bool, recovered: list[str], workspace: Workspace) -> MergeResult:
    plan = _inspect(base_dir, adapter, opts, workspace)  # as given: a named adapter's trainer folder is found from it
    stages = plan.stages
    if plan.problems:
        raise IncompatibleError(list(plan.problems))
    engine, reason = choose_engine(plan)
    if opts.merge_base == "nf4":  # before anything is written: the round trip needs bitsandbytes
        from .quantized import require_nf4

        require_nf4()
    check_free_space(out, output_bytes(plan))
    check_memory(plan, engine)
    for story in plan.stories:
        log.debug(story)
    for note in plan.notes:
        log.warning(note)

    from .model_card import write_card
    from .outputs import write_metadata
    from .report import plan_summary, versions, write_report
    from .serving import check_serving

    stats: dict = {}
    with staging_folder(out) as tmp:
        with _progress(len(plan.ops), f"merging ({engine})", quiet) as tick:
            if engine == "stream":
                from .engines.stream import execute_stream

                files = execute_stream(plan, tmp, tick, stats)
            else:
                from .engines.peft import execute_peft

                files = execute_peft(plan, tmp, tick, stats)
        write_metadata(plan, tmp)
        # LoRA on raw parameters and other PEFT types have no per-module check, and a stack's is proven
        # stage by stage: only the logits prove them
        mode = "full" if (plan.merged_by_peft or len(plan.stages) > 1) and opts.validate == "fast" else opts.validate
        report = validate_output(tmp, plan, mode)
        if not report.ok:
            raise ValidationFailedError(f"the merged checkpoint failed validation, {out} was not written: " + "; ".join(f.message for f in report.findings[:3]), report)
        report.serving = check_serving(tmp, plan.base.folder)
        fields = {
            "merger_report": 1,
            "inputs": {"base": str(base_dir), "adapter": str(adapter_sources(adapter)[-1]),
                       **({"initial_adapter": str(opts.initial_adapter)} if opts.initial_adapter else {}),
                       **({"stages": [str(source) for source in adapter_sources(adapter)]} if len(stages) > 1 else {}),
                       "sha256": hasher.results()},
            "versions": versions(),
            "engine": {"name": engine, "reason": reason},
            "options": opts.__dict__,
            "plan": plan_summary(plan),
            "validation": report.to_dict(),
            "serving": report.serving,
            "output": {"path": str(out)},
            "recovered": recovered,
        }
        if opts.merge_base != "original":  # what merging into the QLoRA base changed, against the original weights
            fields["merge_base"] = {"mode": opts.merge_base, "modules": stats.get("merge_base_modules", 0),
                                    "max_rel_difference_from_original": stats.get("merge_base_max_rel_difference")}
        write_card(tmp, plan, fields)
        size = sum(p.stat().st_size for p in tmp.iterdir() if p.is_file())
        fields["output"].update(files=sorted(p.name for p in tmp.iterdir()), bytes=size,
                                seconds=round(time.monotonic() - started, 3))
        write_report(tmp, fields)
        promote(tmp, out, opts.overwrite)
    return MergeResult(out, engine, reason, plan, report, time.monotonic() - started, size, sorted(files))


class _progress:
    """A tqdm bar on a terminal, nothing otherwise; yields a tick(n) function."""

    def __init__(self, total: int, desc: str, quiet: bool):
        self.total, self.desc = total, desc
        self.enabled = not quiet and sys.stderr.isatty()
        self.bar = None

    def __enter__(self):
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=self.desc, unit="tensor", leave=False)
            return self.bar.update
        return None

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False


def validate_checkpoint(out: str | os.PathLike, base: str | os.PathLike, adapter: str | os.PathLike,
                        mode: str = "fast", options: MergeOptions | None = None, **overrides) -> ValidationReport:
    """Check an existing merged folder (ours or another tool's) against what base + adapter require."""
    if mode not in ("fast", "full"):
        raise OptionsError(f"validate_checkpoint: mode {mode!r} is not fast or full")
    opts = _options(options, overrides)
    out_dir = resolve_folder(out, "out")
    if opts.dtype == "auto":
        # judge the checkpoint in the dtype it was written in
        from .checkpoint import inspect_checkpoint_folder

        try:
            opts = opts.replace(dtype=inspect_checkpoint_folder(out_dir).dtype)
        except MergerError:
            pass
    from .serving import check_serving

    workspace = Workspace(None)
    try:
        plan = _inspect(base, adapter, opts, workspace)
        if plan.problems:
            raise IncompatibleError(list(plan.problems))
        report = validate_output(out_dir, plan, mode)
    finally:
        workspace.remove()
    report.serving = check_serving(out_dir, plan.base.folder)
    return report


def repair_checkpoint(out: str | os.PathLike, base: str | os.PathLike | None = None) -> list[str]:
    """Fix the metadata serving engines and converters read in a merged folder (vocab_size, tie flags,
    dtype, generation config stop tokens; with ``base``, tokenizer files), atomically, never the
    weights. Returns one line per change."""
    from .repair import repair_folder

    out_dir = resolve_folder(out, "out")
    return repair_folder(out_dir, resolve_folder(base, "base") if base is not None else None)
