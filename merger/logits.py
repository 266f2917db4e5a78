"""validate 'full': the merged model's logits against base + unmerged adapter, through PEFT itself."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

# token ids a text-only forward pass must not contain (they expect pixel/audio features)
_MEDIA_TOKEN_KEYS = ("image_token_index", "image_token_id", "video_token_id", "audio_token_id", "video_token_index")


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def probe_ids(plan, count: int = 24) -> list[int]:
    """Prompt ids: every added token the adapter's tokenizer defines, then ordinary ids."""
    import random

    rows = plan.embed.rows if plan.embed else plan.base.text_config.get("vocab_size", 100)
    config = plan.base.config
    banned = {config.get(k) for k in _MEDIA_TOKEN_KEYS} | {plan.base.text_config.get(k) for k in _MEDIA_TOKEN_KEYS}
    stages = plan.stages
    share = 16 // len(stages) or 1  # a stack is proven on every stage's added tokens
    trained_rows = plan.embed.rows - plan.embed_design_pad if plan.embed else rows  # appended design rows hold no token
    added, new = [], []
    for stage in stages:
        if stage.adapter.tokenizer:
            added += [i for i, _, _ in stage.adapter.tokenizer.added_tokens if i < rows and i not in banned][-share:]
        if stage.embed:
            new += [i for i in stage.embed.grown_rows if i not in banned and i < trained_rows][:share]
    rng = random.Random(0)
    first_rows = plan.first.embed.base_rows if plan.first.embed else rows
    ordinary = [rng.randrange(0, min(rows, first_rows)) for _ in range(count)]
    ids = list(dict.fromkeys(added + new))
    ids += [i for i in ordinary if i not in banned][: max(8, count - len(ids))]
    return ids


def check_logits(out_dir: Path, plan, report) -> None:
    import torch

    from .engines.peft import load_pretrained, model_class, reference_model
    from .errors import CheckpointError
    from .validate import FP32_REL_TOL, LOW_PRECISION_REL_TOL, exceeds

    per_expert = next((s.checkpoint_modules[0] for s in plan.stages if s.checkpoint_modules), None)
    if per_expert:
        report.checks.append(f"logits comparison skipped: the adapter trains per-expert modules ({per_expert}) that today's "
                             "transformers stacks into one parameter, so PEFT cannot load it as the reference; the per-module "
                             "checks prove each expert")
        report.metrics["logits_checked"] = False
        return
    need = plan.first.base.total_bytes * 2 * (4 // max(1, _bytes_per(plan.first.base.dtype)))
    if need > 0.8 * available_memory():
        report.checks.append(f"logits comparison skipped: base + merged model need about {need / 1e9:.1f} GB, {available_memory() / 1e9:.1f} GB available")
        report.metrics["logits_checked"] = False
        return
    ids = torch.tensor([probe_ids(plan)])
    with torch.no_grad():
        model = reference_model(plan)
        reference = model(input_ids=ids).logits.float()
        del model
        cls = model_class(plan)
        try:
            merged = load_pretrained(cls, out_dir, dtype=getattr(torch, plan.dtype),
                                     trust_remote_code=plan.options.trust_remote_code).eval()
        except CheckpointError as exc:  # the output does not load: that is the finding
            report.fail("unloadable", str(exc))
            return
        got = merged(input_ids=ids).logits.float()
    if got.shape != reference.shape:
        report.fail("logits-shape", f"merged logits have shape {list(got.shape)}, base+adapter {list(reference.shape)}")
        return
    scale = reference.abs().max().item() or 1.0
    err = (got - reference).abs().max().item() / scale
    tol = FP32_REL_TOL if plan.dtype == "float32" else LOW_PRECISION_REL_TOL.get(plan.dtype, 3e-2)
    report.metrics["max_rel_error_logits"] = err
    report.metrics["logits_checked"] = True
    if exceeds(err, tol):
        report.fail("logits-differ", f"merged logits differ from base + unmerged adapter by {err:.2e} of their range (tolerance {tol:.0e}) on ids {ids[0, :8].tolist()}...")
    report.checks.append(f"logits equal base + unmerged adapter on {ids.shape[1]} ids incl. added tokens (max error {err:.1e} of range)")


def _bytes_per(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, 4)
