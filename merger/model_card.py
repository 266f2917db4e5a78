"""README.md in OUT: a model card with the Hub's metadata for a model made from a base, and what
merger did and proved (vocabulary, added tokens, validation, serving readiness, input hashes)."""

from __future__ import annotations

import re
from pathlib import Path

from .inputs import confined

CARD_NAME = "README.md"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
_CARRIED_KEYS = ("license", "license_name", "license_link", "language", "datasets")  # from the inputs' own cards


def hub_id(plan) -> str | None:
    """The base as a Hub model id, when it is one: the adapter's recorded base, or a Hub cache path."""
    recorded = str(plan.adapter.config.get("base_model_name_or_path") or "")
    if _REPO_ID.match(recorded) and not Path(recorded).exists():
        return recorded
    folder = Path(plan.base.folder).resolve()
    for part in folder.parts:
        if part.startswith("models--") and part.count("--") >= 2:
            return "/".join(part.split("--")[1:3])
    return None


def card_metadata(folder: Path) -> dict:
    """The YAML front matter of a README.md in ``folder`` (empty when absent or unreadable)."""
    import yaml

    if not (folder / CARD_NAME).is_file():
        return {}
    try:
        path = confined(folder, CARD_NAME, "card folder")
        with open(path, "rb") as handle:  # only the front matter's size is ever needed
            text = handle.read(65536).decode("utf-8", errors="replace")
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", text, re.DOTALL)
        if not match or "&" in match.group(1) or "*" in match.group(1):
            return {}
        data = yaml.safe_load(match.group(1))
    except Exception:  # a card is decoration: a malformed one is ignored, never fatal
        return {}
    return data if isinstance(data, dict) else {}


def front_matter(plan) -> dict:
    meta: dict = {}
    for folder in (plan.base.folder, plan.adapter.folder):  # the adapter's card wins
        found = card_metadata(Path(folder))
        meta.update({k: found[k] for k in _CARRIED_KEYS if k in found})
    base = hub_id(plan)
    if base:
        meta["base_model"] = base
        meta["base_model_relation"] = "finetune"
    meta["library_name"] = "transformers"
    if str(plan.adapter.task_type or "").upper() == "CAUSAL_LM":
        meta["pipeline_tag"] = "text-generation"
    meta["tags"] = ["merger", "peft", "lora", "merged"]
    return meta


def render_card(plan, fields: dict) -> str:
    """The card's text from the plan and the report fields (the same facts merge_report.json records)."""
    import yaml

    summary = fields["plan"]
    validation = fields["validation"]
    lines = ["---", yaml.safe_dump(front_matter(plan), sort_keys=False).strip(), "---", "",
             f"# {Path(fields['output']['path']).name}", "",
             f"A merged checkpoint: the PEFT adapter `{Path(plan.adapter.folder).name}` ({', '.join(plan.adapter.variants())}) "
             f"merged into `{hub_id(plan) or Path(plan.base.folder).name}` by merger's {fields['engine']['name']} engine. "
             "It loads like any transformers model; no PEFT needed.", ""]
    if plan.stories:
        lines += ["## Vocabulary", ""] + [f"- {story}" for story in plan.stories] + [""]
    if summary["added_tokens"]:
        lines += ["| id | token | special | row trained |", "|---|---|---|---|"]
        lines += [f"| {t['id']} | `{_cell(t['token'])}` | {t['special']} | {t['row_trained']} |" for t in summary["added_tokens"][:64]]
        more = len(summary["added_tokens"]) - 64
        lines += ([f"| ... | {more} more in merge_report.json | | |"] if more > 0 else []) + [""]
    lines += ["## Validation", "", f"Mode `{validation['mode']}`: " + ("passed" if validation["ok"] else "FAILED") + "."]
    lines += [f"- {check}" for check in validation["checks"]]
    metrics = {k: v for k, v in validation["metrics"].items() if isinstance(v, float)}
    if metrics:
        lines += [f"- largest relative errors: " + ", ".join(f"{k} {v:.1e}" for k, v in metrics.items())]
    if fields.get("serving"):
        lines += ["", "## Serving readiness", "", "| reader | ready | notes |", "|---|---|---|"]
        for row in fields["serving"]:
            notes = "; ".join(_cell(p["message"]) for p in row["problems"]) or "-"
            lines.append(f"| {row['reader']} | {'yes' if row['ok'] else 'no'} | {notes} |")
    lines += ["", "## Inputs", "", "| input | file | sha256 |", "|---|---|---|"]
    for role, files in fields["inputs"]["sha256"].items():
        for name, digest in sorted(files.items()):
            lines.append(f"| {role} | {_cell(name)} | `{digest}` |")
    versions = ", ".join(f"{k} {v}" for k, v in fields["versions"].items() if v)
    lines += ["", f"Made with {versions}. Full details: `merge_report.json`.", ""]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")[:200]


def write_card(out_dir: Path, plan, fields: dict) -> None:
    (out_dir / CARD_NAME).write_text(render_card(plan, fields), encoding="utf-8")
