"""Text and JSON renderings of plans, results and validation reports (for the CLI and notebooks)."""

from __future__ import annotations

import dataclasses

from .report import plan_summary
from .tensors import numel


def plan_dict(plan) -> dict:
    summary = plan_summary(plan)
    summary["estimates"] = estimates(plan)
    return summary


PROCESS_BYTES = 400_000_000  # Python with torch and transformers imported (measured: 0.35-0.43 GB)


def estimates(plan) -> dict:
    """Rough peak memory and disk per engine, from the plan's shapes and scripts/bench.py's measurements."""
    from .engines.stream import BLOCK_BYTES

    from .preflight import output_bytes

    out_bytes = output_bytes(plan)
    largest = max((numel(op.shape) for op in plan.ops), default=0)
    block = min(largest * 4, BLOCK_BYTES)
    return {
        "disk_bytes": out_bytes,
        # row blocks: float32 work, staging, two output buffers; plus the whole adapter tensors it holds
        "stream_peak_ram_bytes": PROCESS_BYTES + 4 * block,
        "stream_peak_gpu_bytes": 2 * block,
        # the model in memory (spread over GPUs by the device map when present) and its resized copies
        "peft_peak_ram_bytes": PROCESS_BYTES + int(1.3 * plan.base.total_bytes),
        "peft_peak_gpu_bytes": int(1.1 * plan.base.total_bytes),
    }


def human_bytes(count: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count} B"


def plan_text(plan) -> str:
    s = plan_dict(plan)
    stages = s["stages"]
    if len(stages) == 1:
        lines = [f"adapter: {', '.join(s['adapter_type'])} on {s['model_class']}"]
        lines += [f"  {d['story']}" for d in (s["embed"], s["head"]) if d]
    else:
        lines = [f"{len(stages)} stacked adapters on {s['model_class']}, merged in order in one pass:"]
        for stage in stages:
            ops = ", ".join(f"{n} {k}" for k, n in sorted(stage["operations"].items()) if k != "copied")
            name = stage["adapter"].rstrip("/").rsplit("/", 1)[-1]
            lines.append(f"  stage {stage['stage']} ({name}): {', '.join(stage['adapter_type'])}; {ops or 'nothing changed'} "
                         f"[{stage['adapter']}]")
            lines += [f"    {story}" for story in stage["stories"]]
    embed = s["embed"]
    if embed and embed["padding_rows"]:
        first, last = embed["padding_rows"]
        lines.append(f"  rows {first}-{last} are padding: no token uses them (pad_to_multiple_of)")
    if embed and embed["rows"] != embed["base_rows"] and embed["source"] == "adapter":
        lines.append(f"  plain PEFT fails on this pair (size mismatch: the adapter's {embed['rows']} rows vs the base's "
                     f"{embed['base_rows']}); merge-adapter resizes the base to exactly {embed['rows']} rows first")
    if s["added_tokens"]:
        shown = ", ".join(f"{t['token']}={t['id']}{'' if t['row_trained'] else ' (untrained)'}" for t in s["added_tokens"][:12])
        lines.append(f"added tokens: {shown}{' ...' if len(s['added_tokens']) > 12 else ''}")
    ops = ", ".join(f"{n} {k}" for k, n in sorted(s["operations"].items()))
    lines.append(f"tensors: {ops} ({s['lora_modules']} LoRA modules)")
    lines.append(f"tie_word_embeddings: {s['tie_word_embeddings']}; dtype: {s['dtype']}")
    edits = ", ".join(f"{k}={v}" for k, v in s["config_edits"].items())
    lines.append(f"config edits: {edits}")
    lines.append(f"tokenizer: {s['tokenizer']['source']} ({s['tokenizer']['reason']})")
    if plan.outputs is not None:
        lines += plan.outputs.lines()
    e = s["estimates"]
    lines.append(f"estimates: output {human_bytes(e['disk_bytes'])}; peak RAM stream ~{human_bytes(e['stream_peak_ram_bytes'])}, "
                 f"peft ~{human_bytes(e['peft_peak_ram_bytes'])} (on a GPU: stream ~{human_bytes(e['stream_peak_gpu_bytes'])}, "
                 f"peft ~{human_bytes(e['peft_peak_gpu_bytes'])} spread by the device map)")
    engine = "stream" if not s["stream_blockers"] else f"peft (stream cannot: {'; '.join(s['stream_blockers'])})"
    lines.append(f"engine (auto): {engine}")
    lines += [f"note: {n}" for n in s["notes"]]
    lines += [f"problem: {p}" for p in s["problems"]]
    if s["problems"]:
        lines.append("merge-adapter would refuse this merge (exit 2)")
    return "\n".join(lines)


def report_text(report) -> str:
    lines = [report.summary()]
    lines += [f"  ok: {c}" for c in report.checks]
    lines += [f"  FAIL [{f.code}]: {f.message}" for f in report.findings]
    lines += serving_text(report.serving)
    return "\n".join(lines)


def serving_text(rows: list[dict]) -> list[str]:
    """The serving-readiness rows as text: a summary line, then each problem with its fix."""
    if not rows:
        return []
    from .serving import summary_line

    lines = [summary_line(rows)]
    seen = set()
    for row in rows:
        for problem in row["problems"]:
            if problem["message"] not in seen:
                seen.add(problem["message"])
                label = "WARNING" if problem["severity"] == "warning" else "NOT READY"
                lines.append(f"  {label}: {problem['message']} (fix: {problem['fix']})")
    return lines


def result_dict(result) -> dict:
    return {
        "ok": result.validation.ok,
        "out": str(result.out),
        "engine": result.engine,
        "engine_reason": result.engine_reason,
        "seconds": round(result.seconds, 3),
        "bytes": result.size_bytes,
        "files": result.files,
        "plan": plan_summary(result.plan),
        "validation": result.validation.to_dict(),
        "hub": dataclasses.asdict(result.hub) if result.hub else None,
    }


def html_block(title: str, text: str) -> str:
    """A notebook rendering: a title and the text report, escaped, monospaced."""
    import html

    return f"<details open><summary><b>{html.escape(title)}</b></summary><pre>{html.escape(text)}</pre></details>"
