"""Prove a written checkpoint right by reading it back from disk.

Never the in-memory objects: the point is to catch what was lost on the way to disk (a dropped
tensor, stale vocab_size, a head re-tied on load, untrained rows where trained ones belong).

Memory stays a few row blocks whatever the model's size, as in the stream engine: every value check
reads the output and the inputs block by block through the safetensors library (a different road
than the engine's pread), and the LoRA check computes W_merged·x against W·x + s·B(A·x) one block of
output rows at a time (Conv1D: of input rows, summed; DoRA on Conv1D and embeddings: norms first).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputFileError, MergerError
from .inputs import confined, input_files, read_json
from .keys import ADAPTER_FILES, CONFIG, SAFE_INDEX
from .plan import MergePlan
from .tensors import read_safetensors_header
from .tokenizer_facts import read_tokenizer_facts
from .validation_io import (  # noqa: F401 (LibraryTensors, index_blocks: re-exported, the readers' old home)
    ErrorNorm,
    LibraryTensors,
    StartRows,
    non_finite_tensors,
    gather,
    index_blocks,
    open_base,
    open_independently,
    release_freed_memory,
    row_blocks,
)

log = logging.getLogger(__name__)

SAMPLED_MODULES = 8
FLOAT_TAGS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0"}
# fp32: merged vs unmerged differ only in the order of float operations (W+BA)x vs Wx+B(Ax)
FP32_REL_TOL = 1e-4
# bf16/fp16: the merged weights are rounded to 8 (11) significant bits once more than the reference
LOW_PRECISION_REL_TOL = {"bfloat16": 3e-2, "float16": 5e-3}


def exceeds(error: float, tolerance: float) -> bool:
    """True when a measured error fails: above the tolerance, or NaN (NaN compares as nothing)."""
    return not error <= tolerance


def worse(current: float, error: float) -> float:
    """The worse of two measured errors; NaN is the worst of all."""
    if math.isnan(current) or math.isnan(error):
        return math.nan
    return max(current, error)


@dataclass(frozen=True)
class Finding:
    code: str  # stable identifier, e.g. "missing-tensor"
    message: str


@dataclass(repr=False)
class ValidationReport:
    mode: str
    findings: list[Finding] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    serving: list = field(default_factory=list)  # readiness per reader (serving.py); not part of ok

    @property
    def ok(self) -> bool:
        return not self.findings

    def fail(self, code: str, message: str) -> None:
        self.findings.append(Finding(code, message))

    def __repr__(self) -> str:
        from .render import report_text

        return report_text(self)

    def _repr_html_(self) -> str:
        from .render import html_block, report_text

        return html_block("validation", report_text(self))

    def to_dict(self) -> dict:
        return {"mode": self.mode, "ok": self.ok, "checks": self.checks, "metrics": self.metrics,
                "findings": [{"code": f.code, "message": f.message} for f in self.findings], "serving": self.serving}

    def summary(self) -> str:
        if self.mode == "off":
            return "validation off"
        if self.mode == "none":
            return "weights not checked (pass --adapter, and --base, to prove them)"
        if self.ok:
            parts = [f"{label} {self.metrics[key]:.1e}" for key, label in
                     (("max_rel_error_modules", "modules"), ("max_rel_error_new_rows", "new rows"), ("max_rel_error_logits", "logits"))
                     if isinstance(self.metrics.get(key), float)]
            extra = f", worst relative error: {', '.join(parts)}" if parts else ""
            return f"validation {self.mode}: {len(self.checks)} checks passed{extra}"
        return f"validation {self.mode} FAILED: " + "; ".join(f.message for f in self.findings[:3])


class OutputReader:
    """Tensors of a written checkpoint, found by their planned names.

    A checkpoint written by another tool (or by transformers' save) may name tensors differently
    from the base (``h.0.attn`` vs ``transformer.h.0.attn``, legacy vs new LLaVA names, per-expert
    vs fused MoE weights); planned and written names are matched in the model's own namespace.
    """

    def __init__(self, folder: Path, plan: MergePlan):
        from collections import Counter, defaultdict

        self.folder, self.plan = folder, plan
        self.disk: dict = {}
        for path in input_files(folder, "merged folder", pattern="*.safetensors"):
            metas = read_safetensors_header(path)
            twice = sorted(set(metas) & set(self.disk))
            if twice:
                raise ValueError(f"{twice[0]}: in both {self.disk[twice[0]].file} and {path.name}")
            self.disk.update(metas)
        self.by_model = defaultdict(list)
        for name in self.disk:
            self.by_model[model_name(plan, name)].append(name)
        counts = Counter(model_name(plan, op.out_key) for op in plan.ops)
        # several planned tensors that load into one model parameter (converted layouts): no 1:1 shapes
        self.fused = {m for m, c in counts.items() if c > 1}
        self.tensors = LibraryTensors(folder, self.disk)  # by their names on disk, in row blocks

    def find(self, planned: str) -> str | None:
        """The name on disk of a planned tensor, or None when it is not there."""
        if planned in self.disk:
            return planned
        names = self.by_model.get(model_name(self.plan, planned), [])
        return names[0] if len(names) == 1 else None

    def one_to_one(self, planned: str) -> bool:
        return model_name(self.plan, planned) not in self.fused

    def read(self, disk_name: str):
        """A whole tensor (the value checks read row blocks through ``self.tensors`` instead)."""
        return self.tensors.read(disk_name)

    def get(self, planned: str):
        return self.read(self.find(planned))


def model_name(plan: MergePlan, key: str) -> str:
    """A checkpoint key in the model's namespace, whatever prefix convention wrote it."""
    mapping = plan.layout.to_model_key
    if key in mapping:
        return mapping[key]
    prefix = plan.layout.base_model_prefix
    if prefix and key.startswith(prefix + "."):
        key = key[len(prefix) + 1:]
    return key


def validate_output(out_dir: str | Path, plan: MergePlan, mode: str = "fast") -> ValidationReport:
    """Check ``out_dir`` against ``plan``; ``mode`` is 'fast' or 'full' ('off' checks nothing)."""
    out_dir = Path(out_dir)
    report = ValidationReport(mode)
    if mode == "off":
        return report
    try:
        reader = OutputReader(out_dir, plan)
    except Exception as exc:  # a truncated or corrupt shard: the finding, not a crash
        report.fail("unreadable-shard", str(exc))
        return report
    try:
        _check_structure(out_dir, plan, reader, report)
    except MergerError as exc:  # a malformed config.json or index, a link out of the folder
        report.fail("unreadable-file", str(exc))
        return report
    if report.ok:
        release_freed_memory()
        _check_values(plan, reader, report)
    if report.ok and mode == "full":
        from .logits import check_logits

        check_logits(out_dir, plan, report)
    return report


def _check_structure(out_dir: Path, plan: MergePlan, reader: OutputReader, report: ValidationReport) -> None:
    claimed = set()
    for op in plan.ops:
        disk = reader.find(op.out_key)
        if disk is None:
            report.fail("missing-tensor", f"{op.out_key}: planned but not in any shard of {out_dir}")
            continue
        claimed.add(disk)
        if reader.one_to_one(op.out_key) and tuple(reader.disk[disk].shape) != tuple(op.shape):
            report.fail("wrong-shape", f"{op.out_key}: shape {list(reader.disk[disk].shape)} on disk, planned {list(op.shape)}")
    for name in sorted(set(reader.disk) - claimed):
        if "lora_" in name or "modules_to_save" in name or "base_layer" in name:
            report.fail("unmerged-adapter-key", f"{name}: an unmerged adapter tensor in the output; the adapter was saved, not merged")
        elif plan.head and plan.tie_word_embeddings and model_name(plan, name) == f"{plan.layout.head_module}.weight":
            pass  # an explicit copy of a tied head: transformers ties it back on load
        else:
            report.fail("unexpected-tensor", f"{name}: in the output but not in the plan")
    report.checks.append(f"{len(reader.disk)} tensors present with planned shapes")

    index_path = out_dir / SAFE_INDEX
    if index_path.is_file():
        index = read_json(confined(out_dir, SAFE_INDEX, "merged folder"), "shard index")
        if not isinstance(index, dict) or not isinstance(index.get("weight_map", {}), dict) or not isinstance(index.get("metadata", {}), dict):
            raise InputFileError(f"{out_dir / SAFE_INDEX}: not an index (a JSON object with a weight_map object and a metadata object)")
        weight_map = index.get("weight_map", {})
        on_disk = {k: m.file for k, m in reader.disk.items()}
        wrong = [k for k, f in weight_map.items() if on_disk.get(k) != f]
        if wrong or set(weight_map) != set(on_disk):
            report.fail("bad-index", f"{SAFE_INDEX}: weight_map disagrees with the shards ({(wrong or sorted(set(on_disk) ^ set(weight_map)))[:3]})")
        total = sum(m.nbytes for m in reader.disk.values())
        if index.get("metadata", {}).get("total_size") not in (None, total):
            report.fail("bad-index", f"{SAFE_INDEX}: total_size {index['metadata']['total_size']} but the tensors hold {total} bytes")
        report.checks.append("shard index matches the files")

    leftovers = [n for n in ADAPTER_FILES if n != "README.md" and (out_dir / n).exists()]
    if leftovers:
        report.fail("adapter-files", f"{out_dir}: holds adapter files {leftovers}; loaders would treat it as an adapter")

    config = read_json(confined(out_dir, CONFIG, "merged folder"), "config") if (out_dir / CONFIG).is_file() else None
    if config is not None and not isinstance(config, dict):
        raise InputFileError(f"{out_dir / CONFIG}: a JSON {type(config).__name__}, not a config object")
    if config is None:
        report.fail("missing-config", f"{out_dir}: no config.json")
        return
    if plan.embed:
        rows = plan.embed.rows
        embed_key = next((op.out_key for op in plan.ops if op.shape and op.shape[0] == rows and plan.layout.to_model_key.get(op.out_key, op.out_key) == f"{plan.layout.embed_module}.weight"), None)
        if embed_key and reader.find(embed_key):
            rows = reader.disk[reader.find(embed_key)].shape[0]
        for path in ["vocab_size"] + ([f"{plan.base.text_config_key}.vocab_size"] if plan.base.text_config_key else []):
            value = config.get(path) if "." not in path else config.get(path.split(".")[0], {}).get("vocab_size")
            if value is not None and value != rows - plan.embed_extra_rows:
                design = f" ({plan.embed_extra_rows} rows beyond vocab_size by design)" if plan.embed_extra_rows else ""
                report.fail("stale-vocab-size", f"config.json {path} is {value} but the embedding has {rows} rows{design}")
        report.checks.append("vocab_size matches the embedding rows")
        tokenizer = read_tokenizer_facts(out_dir)
        base_bound = plan.base.tokenizer.id_bound if plan.base.tokenizer else None
        if tokenizer and tokenizer.id_bound and tokenizer.id_bound > rows:
            if base_bound and tokenizer.id_bound <= base_bound and rows >= plan.embed.base_rows:
                # the base shipped this way (Gemma 3 text models: an image token past the text rows)
                span = f"{rows}-{tokenizer.id_bound - 1}" if tokenizer.id_bound - 1 > rows else str(rows)
                report.checks.append(f"tokenizer ids {span} have no row, as in the base itself")
            else:
                report.fail("token-id-out-of-range", f"the tokenizer in {out_dir} has ids up to {tokenizer.id_bound - 1} but the embedding has {rows} rows")
        if tokenizer and plan.adapter.tokenizer and tokenizer.length != plan.adapter.tokenizer.length and plan.tokenizer_source == plan.adapter.tokenizer.folder:
            report.fail("wrong-tokenizer", f"the tokenizer in {out_dir} has {tokenizer.length} tokens, the adapter's {plan.adapter.tokenizer.length}")
        report.checks.append("every tokenizer id has a row")
    tie = config.get("tie_word_embeddings", (config.get(plan.base.text_config_key or "", {}) or {}).get("tie_word_embeddings", True))
    text_tie = (config.get(plan.base.text_config_key) or {}).get("tie_word_embeddings") if plan.base.text_config_key else None
    if bool(tie) != plan.tie_word_embeddings or (text_tie is not None and bool(text_tie) != plan.tie_word_embeddings):
        report.fail("wrong-tie-flag", f"config.json tie_word_embeddings is {tie} (text_config: {text_tie}) but the merge needs {plan.tie_word_embeddings}")
    report.checks.append("tie flag matches the tensors")


def _check_values(plan: MergePlan, reader: OutputReader, report: ValidationReport) -> None:
    bad = non_finite_tensors(reader.tensors, reader.disk, {name for name, meta in reader.disk.items() if meta.dtype in FLOAT_TAGS})
    for name in bad:
        report.fail("non-finite", f"{name}: holds NaN or Inf values")
    report.checks.append("every tensor finite")

    def checkable(op) -> bool:  # found on disk with its planned shape (per-expert tensors: by their own name)
        return bool(reader.find(op.out_key)) and (reader.one_to_one(op.out_key) or (
            op.out_key in reader.disk and tuple(reader.disk[op.out_key].shape) == tuple(op.shape)))

    lora_ops = [op for op in plan.ops if (op.lora or op.expert) and checkable(op)]
    sample = _sample(lora_ops)
    worst = 0.0
    # a second opinion: the inputs are read through the safetensors library, not the engine's reader
    adapter, base = open_independently(plan.adapter.folder, plan.adapter.tensors), open_base(plan)
    try:
        tol = FP32_REL_TOL if plan.dtype == "float32" else LOW_PRECISION_REL_TOL.get(plan.dtype, 3e-2)
        _check_copies(plan, reader, base, report)
        for op in sample:
            err = _expert_error(op, plan, reader, adapter, base) if op.expert else _module_error(op, plan, reader, adapter, base)
            worst = worse(worst, err)
            if exceeds(err, tol):
                report.fail("lora-not-merged", f"{op.out_key}: W_merged·x differs from W·x + s·B(A·x) by {err:.2e} (relative; tolerance {tol:.0e}): the LoRA update is missing or wrong")
        report.metrics["max_rel_error_modules"] = worst
        report.metrics["modules_checked"] = len(sample)
        if sample:
            report.checks.append(f"{len(sample)} sampled LoRA modules match W·x + s·B(A·x)")
        _check_new_rows(plan, reader, adapter, report, tol)
    finally:
        adapter.close()
        base.close()


def _module_error(op, plan, reader, adapter, base) -> float:
    """Relative error of the merged module applied to random inputs against the unmerged formula,
    computed over row blocks of the merged weight and of its start."""
    import torch

    from .lora import dora_weight, linear_delta

    out_name = reader.find(op.out_key)
    shape = tuple(reader.disk[out_name].shape)
    source, key = (adapter, op.replace_key) if op.replace_key else (base, op.base_key)
    start_meta = (plan.adapter.tensors if op.replace_key else plan.base.tensors)[key]
    start = StartRows(source, key, start_meta.shape, shape[0], plan.options.new_rows)
    lora, error = op.lora, ErrorNorm()
    magnitude = adapter.read(lora.magnitude_key).float() if lora.magnitude_key else None
    gen = torch.Generator().manual_seed(0)
    if lora.kind == "embedding":  # (num, dim): sampled rows; A is (r, num), B is (dim, r)
        rows = torch.randint(0, shape[0], (16,), generator=gen).tolist()
        b = adapter.read(lora.b_key).float()
        expected = start.at(rows) + (gather(adapter, lora.a_key, rows, dim=1).T @ b.T) * lora.scale
        if magnitude is not None:  # PEFT normalises each embedding column over all rows
            expected = expected * (magnitude.view(1, -1) / _column_norms(start, shape, lambda i, j: (
                b @ adapter.slice(lora.a_key, (slice(None), slice(i, j))).float()).T * lora.scale))
        error.add(gather(reader.tensors, out_name, rows), expected * op.multiply)
        return error.value()
    a = adapter.read(lora.a_key).float()
    if lora.kind == "conv1d":  # (in, out), y = Wᵀx: blocks of input rows, summed
        b = adapter.read(lora.b_key).float()
        x = torch.randn(shape[0], 4, generator=gen)
        got = torch.zeros(shape[1], 4)
        expected = lora.scale * (b @ (a @ x))
        factor = None
        if magnitude is not None:  # PEFT normalises each Conv1D output column over all input rows
            def delta(i, j):
                return linear_delta(a[:, i:j], b, lora.scale, fan_in_fan_out=True)
            factor = magnitude.view(1, -1) / _column_norms(start, shape, delta)
            expected = torch.zeros(shape[1], 4)
        for i, j in row_blocks(shape[0], shape):
            got += reader.tensors.slice(out_name, i, j).float().T @ x[i:j]
            if factor is None:
                expected += start(i, j).T @ x[i:j]
            else:
                expected += ((start(i, j) + delta(i, j)) * factor).T @ x[i:j]
        error.add(got, expected * op.multiply)
        return error.value()
    x = torch.randn(shape[1], 4, generator=gen)  # linear (out, in): output rows are independent
    ax = a @ x
    for i, j in row_blocks(shape[0], shape):
        b = adapter.slice(lora.b_key, slice(i, j)).float()
        if magnitude is None:
            expected = start(i, j) @ x + lora.scale * (b @ ax)
        else:  # DoRA's norm is per output row: exact block by block
            expected = dora_weight(start(i, j), linear_delta(a, b, lora.scale), magnitude[i:j]) @ x
        error.add(reader.tensors.slice(out_name, i, j).float() @ x, expected * op.multiply)
    return error.value()


def _expert_error(op, plan, reader, adapter, base) -> float:
    """Relative error of a stacked-expert LoRA's tensor: W_merged·x against W·x + ΔW_e·x for one expert's
    tensor, or for the first and last experts of a stack, ΔW_e built here by PEFT's definition
    (B_e = B[:, r·E + e], A_e = A[e·r:(e+1)·r]), independently of the engine's batched factors."""
    import torch

    delta = op.expert
    out_name = reader.find(op.out_key)
    shape = tuple(reader.disk[out_name].shape)
    a, b = adapter.read(delta.a_key).float(), adapter.read(delta.b_key).float()
    rank = a.shape[0] // delta.experts
    gen = torch.Generator().manual_seed(0)
    error = ErrorNorm()
    experts = [delta.expert] if delta.expert is not None else sorted({0, delta.experts - 1})
    for expert in experts:
        update = b[:, [r * delta.experts + expert for r in range(rank)]] @ a[expert * rank:(expert + 1) * rank]
        update = (update if delta.b_first else update.T) * delta.scale
        rows = shape[0] if delta.expert is not None else shape[1]
        update = update[delta.row_offset:delta.row_offset + rows] if delta.expert is not None else update
        x = torch.randn(update.shape[1], 4, generator=gen)
        got, expected = [], []
        for i, j in row_blocks(rows, update.shape):
            index = (slice(i, j),) if delta.expert is not None else (expert, slice(i, j))
            got.append(reader.tensors.pieces(out_name, [index])[0].float() @ x)
            expected.append(base.pieces(op.base_key, [index])[0].float() @ x + update[i:j] @ x)
        error.add(torch.cat(got), torch.cat(expected))
    return error.value()


def _column_norms(start: StartRows, shape, delta):
    """‖W + ΔW‖ per column over all rows, from row blocks; ``delta(i, j)`` gives ΔW's rows."""
    import torch

    squares = torch.zeros(shape[1], dtype=torch.float64)
    for i, j in row_blocks(shape[0], shape):
        squares += (start(i, j) + delta(i, j)).pow(2).sum(dim=0, dtype=torch.float64)
    return squares.sqrt().float().view(1, -1)


def _check_new_rows(plan, reader, adapter, report, tol) -> None:
    """The rows of added tokens hold the adapter's trained values, not the base's or the init rule's."""
    checked = 0
    for decision, module in ((plan.embed, plan.layout.embed_module), (plan.head, plan.layout.head_module)):
        if decision is None or module is None:
            continue
        op = next((o for o in plan.ops if plan.layout.to_model_key.get(o.out_key, o.out_key) == f"{module}.weight"), None)
        if op is None and module == plan.layout.head_module and plan.tie_word_embeddings:
            continue
        if op is None or reader.find(op.out_key) is None:
            continue
        if op.token_rows_key:  # trained token rows overwrite whatever the start held
            rows = list(op.token_indices)

            def expected_rows(c0, c1, rows=rows, key=op.token_rows_key):
                return adapter.slice(key, slice(c0, c1)).float()
        elif op.replace_key:
            source_rows = plan.adapter.tensors[op.replace_key].shape[0]
            rows = [r for r in decision.grown_rows if r < source_rows] or [source_rows - 1]

            def expected_rows(c0, c1, rows=rows, key=op.replace_key):
                return gather(adapter, key, rows[c0:c1])
        else:
            continue
        if op.lora and op.lora.kind == "embedding" and op.lora.magnitude_key:
            continue  # DoRA rescales every column by norms over all rows: the module check covers it
        if op.lora and op.lora.kind != "embedding":
            continue  # head LoRA rows are covered by the module check
        out_name = reader.find(op.out_key)
        b = adapter.read(op.lora.b_key).float() if op.lora else None
        error = ErrorNorm()
        for c0, c1 in row_blocks(len(rows), reader.disk[out_name].shape):
            expected = expected_rows(c0, c1)
            if op.lora:
                expected = expected + (gather(adapter, op.lora.a_key, rows[c0:c1], dim=1).T @ b.T) * op.lora.scale
            error.add(gather(reader.tensors, out_name, rows[c0:c1]), expected * op.multiply)  # multiply: drift.py
        err = error.value()
        report.metrics["max_rel_error_new_rows"] = worse(report.metrics.get("max_rel_error_new_rows", 0.0), err)
        if exceeds(err, tol):
            report.fail("new-rows-lost", f"{op.out_key}: rows {rows[0]}-{rows[-1]} differ from the adapter's trained values by {err:.2e} (relative): the trained new-token rows were lost")
        checked += len(rows)
    if checked:
        report.checks.append(f"{checked} new-token rows hold the adapter's trained values")


def _sample(ops: list) -> list:
    """Up to SAMPLED_MODULES ops: the first, the last and a fixed random draw between them."""
    if len(ops) <= SAMPLED_MODULES:
        return ops
    return [ops[0], ops[-1]] + random.Random(0).sample(ops[1:-1], SAMPLED_MODULES - 2)


def _check_copies(plan, reader, base, report) -> None:
    """Sampled tensors the plan copies (or only grows) hold the base's values, bit for bit after the cast.

    The engine reads the base through its own offsets; this re-reads it through the safetensors
    library, so a reader that took the wrong bytes cannot pass. Compared block by block.
    """
    copies = [op for op in plan.ops if op.base_key and not (op.lora or op.replace_key or op.token_rows_key or op.parameter_lora or op.multiply != 1.0)
              and reader.find(op.out_key) and reader.one_to_one(op.out_key) and op.base_key in plan.base.tensors
              and base.exact(op.base_key)]
    wrong = [op.out_key for op in _sample(copies) if not _copy_equal(reader, reader.find(op.out_key), base, op.base_key, plan.base.tensors[op.base_key].shape)]
    for key in wrong:
        report.fail("copy-differs", f"{key}: differs from the base tensor it copies (read back through the safetensors library)")
    if copies:
        report.checks.append(f"{min(len(copies), SAMPLED_MODULES)} sampled copied tensors equal the base's")


def _copy_equal(reader, out_name: str, base, base_key: str, base_shape) -> bool:
    """The output tensor's rows equal the base's (the rows both have: a grown copy adds rows)."""
    import torch

    got_shape, base_shape = tuple(reader.disk[out_name].shape), tuple(base_shape)
    if not got_shape or not base_shape:
        pairs = [(reader.tensors.read(out_name), base.read(base_key))]
    elif got_shape[1:] != base_shape[1:]:
        return False
    else:
        common = (min(got_shape[0], base_shape[0]),) + got_shape[1:]
        pairs = ((reader.tensors.slice(out_name, index), base.slice(base_key, index)) for index in index_blocks(common))
    for got, start in pairs:
        expected = start.to(got.dtype) if start.is_floating_point() and got.is_floating_point() else start
        if got.shape != expected.shape or not torch.equal(got, expected):
            return False
    return True


