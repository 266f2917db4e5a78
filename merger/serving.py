"""Will the folder load right where users take it? Checked from its files, the way each reader
reads them, not through a transformers reload that may hide a stale flag.

Readers: transformers, vLLM, SGLang, TGI and llama.cpp's converter (convert_hf_to_gguf.py). Each
check names the readers it affects, what they would do, and the fix.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import TEXT_CONFIG_KEYS
from .inputs import confined, input_files, read_json
from .keys import CONFIG, GENERATION_CONFIG
from .metadata import SENTENCEPIECE_MODEL, stop_ids
from .plan_rules import HARD_TIED_MODEL_TYPES
from .tensors import TORCH_NAMES, read_safetensors_header
from .tokenizer_facts import TokenizerFacts, read_tokenizer_facts, sentencepiece_size

READERS = ("transformers", "vLLM", "SGLang", "TGI", "llama.cpp converter")
ENGINES = ("vLLM", "SGLang", "TGI")
EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight", "embed_in.weight")
HEAD_SUFFIXES = ("lm_head.weight", "embed_out.weight")
DESIGN_EXTRA_ROWS = {"mllama": 8}  # embeddings longer than vocab_size by design


@dataclass(frozen=True)
class Problem:
    readers: tuple[str, ...]
    message: str
    fix: str
    severity: str = "error"  # "error": the reader fails or serves it wrong; "warning": cannot be fixed in files


@dataclass(frozen=True)
class FolderFacts:
    """What readers see in a checkpoint folder."""

    folder: Path
    config: dict
    weight_keys: dict  # name -> TensorMeta
    embed_key: str | None
    head_key: str | None
    tokenizer: TokenizerFacts | None
    generation_config: dict | None
    sentencepiece_derived: bool  # tokenizer.json is a SentencePiece conversion (Unigram, or BPE with byte fallback)
    files: frozenset = field(default_factory=frozenset)
    tokenizer_config: dict = field(default_factory=dict)

    @property
    def levels(self) -> list[tuple[str, dict]]:
        """config.json's top level and its language-model level, as (dotted prefix, dict)."""
        key = next((k for k in TEXT_CONFIG_KEYS if isinstance(self.config.get(k), dict)), None)
        return [("", self.config)] + ([(f"{key}.", self.config[key])] if key else [])

    @property
    def model_type(self) -> str:
        text = self.levels[-1][1]
        return str(text.get("model_type") or self.config.get("model_type") or "")

    @property
    def embed_rows(self) -> int | None:
        return self.weight_keys[self.embed_key].shape[0] if self.embed_key else None

    @property
    def weights_dtype(self) -> str | None:
        counts = Counter(m.dtype for m in self.weight_keys.values() if m.dtype in TORCH_NAMES)
        return TORCH_NAMES[counts.most_common(1)[0][0]] if counts else None


def _find(keys, suffixes) -> str | None:
    for suffix in suffixes:
        found = sorted((k for k in keys if k == suffix or k.endswith("." + suffix)), key=len)
        if found:
            return found[0]
    return None


def read_folder(folder: Path) -> FolderFacts:
    config = read_json(confined(folder, CONFIG, "checked folder"), "config")
    metas: dict = {}
    for path in input_files(folder, "checked folder", pattern="*.safetensors"):
        metas.update(read_safetensors_header(path))
    generation = None
    if (folder / GENERATION_CONFIG).is_file():
        generation = read_json(confined(folder, GENERATION_CONFIG, "checked folder"), "generation config")
    tokenizer_json = read_json(confined(folder, "tokenizer.json", "checked folder"), "tokenizer", max_bytes=512 << 20) \
        if (folder / "tokenizer.json").is_file() else None
    model = tokenizer_json.get("model") if isinstance(tokenizer_json, dict) else None
    sentencepiece = isinstance(model, dict) and (model.get("type") == "Unigram" or bool(model.get("byte_fallback")))
    tokenizer_config = read_json(confined(folder, "tokenizer_config.json", "checked folder"), "tokenizer config") \
        if (folder / "tokenizer_config.json").is_file() else {}
    return FolderFacts(folder, config if isinstance(config, dict) else {}, metas, _find(metas, EMBED_SUFFIXES),
                       _find(metas, HEAD_SUFFIXES), read_tokenizer_facts(folder),
                       generation if isinstance(generation, dict) else None, sentencepiece,
                       frozenset(p.name for p in folder.iterdir()),
                       tokenizer_config if isinstance(tokenizer_config, dict) else {})


def head_equals_embed(facts: FolderFacts, sample: int = 64) -> bool | None:
    """Whether the separate head tensor holds the embedding's values (sampled rows, exact); None without one."""
    if not facts.head_key or not facts.embed_key:
        return None
    head, embed = facts.weight_keys[facts.head_key], facts.weight_keys[facts.embed_key]
    if head.shape != embed.shape:
        return False
    import torch
    from safetensors import safe_open

    rows = sorted(set(range(min(sample, head.shape[0]))) | set(random.Random(0).sample(range(head.shape[0]), min(sample, head.shape[0]))))
    with safe_open(str(facts.folder / head.file), framework="pt") as h, safe_open(str(facts.folder / embed.file), framework="pt") as e:
        head_rows = h.get_slice(facts.head_key)
        embed_rows = e.get_slice(facts.embed_key)
        return all(torch.equal(head_rows[r:r + 1], embed_rows[r:r + 1]) for r in rows)


def check_folder(facts: FolderFacts, base_has_sentencepiece: bool | None = None) -> list[Problem]:
    """Every problem a reader would have with the folder; empty when all five read it right."""
    problems: list[Problem] = []
    rows = facts.embed_rows
    extra = DESIGN_EXTRA_ROWS.get(facts.model_type, 0)
    repair = "merge-adapter validate DIR --repair fixes it"
    for prefix, level in facts.levels:
        vocab = level.get("vocab_size")
        if rows is not None and isinstance(vocab, int) and vocab not in (rows, rows - extra):
            problems.append(Problem(READERS, f"config.json {prefix}vocab_size is {vocab} but the embedding has {rows} rows: "
                                    "transformers fails to load it, vLLM and SGLang assert they match, llama.cpp's converter "
                                    "sizes its vocabulary from it", repair))

    flags = {prefix or "top level": level["tie_word_embeddings"] for prefix, level in facts.levels if "tie_word_embeddings" in level}
    if len(set(flags.values())) > 1:
        problems.append(Problem(READERS, f"tie_word_embeddings differs between levels of config.json ({flags}): transformers "
                                "reads one, vLLM and SGLang the language model's", repair))
    declared = next(iter(flags.values()), True) if flags else True
    same = head_equals_embed(facts)
    if declared and same is False:
        problems.append(Problem(READERS, f"tie_word_embeddings is true but {facts.head_key} differs from the embedding: every "
                                "reader ties the head to the embedding and the trained head is ignored", repair))
    if not declared and facts.head_key is None and facts.embed_key is not None:
        problems.append(Problem(READERS, "tie_word_embeddings is false but the folder has no lm_head weight: the head "
                                "would be initialised at random", repair))
    if facts.model_type in HARD_TIED_MODEL_TYPES and same is False:
        problems.append(Problem(("vLLM", "SGLang", "llama.cpp converter"), f"{facts.model_type} is always served with the "
                                "head tied to the embedding (llama.cpp's converter drops lm_head.weight): the trained head, "
                                "which differs, is ignored there", "serve it with transformers, or retrain with the head tied",
                                "warning"))

    top = facts.config
    if not any(top.get(k) for k in ("dtype", "torch_dtype")):
        problems.append(Problem(ENGINES, "config.json names no dtype (null or absent): vLLM and SGLang then load float32, "
                                "twice the memory of the bf16 weights", repair))

    tokenizer = facts.tokenizer
    if tokenizer is not None:
        bound = tokenizer.id_bound
        if rows is not None and bound is not None and bound > rows:
            problems.append(Problem(READERS, f"the tokenizer has ids up to {bound - 1} but the embedding has {rows} rows: "
                                    "those tokens index past the matrix (llama.cpp's converter asserts every id < vocab_size)",
                                    "merge with the adapter's tokenizer and its rows"))
        if tokenizer.complete and "tokenizer.json" not in facts.files:
            problems.append(Problem(("TGI",), "no tokenizer.json: TGI needs a fast tokenizer",
                                    "save the tokenizer with transformers (AutoTokenizer(...).save_pretrained) into the folder"))
        if facts.generation_config is not None:
            stops = stop_ids(facts.generation_config.get("eos_token_id"))
        else:  # transformers derives the generation config from config.json
            stops = stop_ids(facts.levels[-1][1].get("eos_token_id")) or stop_ids(top.get("eos_token_id"))
        missing = [f"{content} ({i})" for i, content, _ in tokenizer.stop_tokens if i not in stops]
        if missing:
            where = "generation_config.json" if facts.generation_config is not None else "config.json (no generation_config.json)"
            problems.append(Problem(("transformers",) + ENGINES, f"{where} eos_token_id {stops} lacks {', '.join(missing)}, which "
                                    "the tokenizer stops on: generation runs past the end of a turn", repair))
        if SENTENCEPIECE_MODEL in facts.files:
            pieces = sentencepiece_size(confined(facts.folder, SENTENCEPIECE_MODEL, "checked folder"))
            decoder = facts.tokenizer_config.get("added_tokens_decoder") or {}
            untyped = [content for i, content, special in tokenizer.added_tokens
                       if special and pieces is not None and i >= pieces and str(i) not in decoder]
            if untyped:
                problems.append(Problem(("llama.cpp converter",), f"special tokens past tokenizer.model ({', '.join(untyped[:4])}) have "
                                        "no added_tokens_decoder entry in tokenizer_config.json: the converter types them as "
                                        "plain text (USER_DEFINED), so they are not treated as special", repair))
        if facts.sentencepiece_derived and SENTENCEPIECE_MODEL not in facts.files:
            count = f" ({tokenizer.length} tokens for {rows} rows: llama.cpp refuses the file)" if rows and tokenizer.length and tokenizer.length != rows else ""
            fix = ("merge-adapter validate DIR --repair --base BASE writes the base's tokenizer.model" if base_has_sentencepiece is not False
                   else "add the SentencePiece tokenizer.model the vocabulary was made from")
            problems.append(Problem(("llama.cpp converter",), "a SentencePiece vocabulary without tokenizer.model: llama.cpp's "
                                    f"converter rebuilds it from tokenizer.json with placeholder scores, so words split wrongly{count}",
                                    fix))
    return problems


def readiness(problems: list[Problem]) -> list[dict]:
    """One row per reader: ok, or its problems and their fixes (the report's "serving" section)."""
    rows = []
    for reader in READERS:
        mine = [p for p in problems if reader in p.readers]
        rows.append({"reader": reader, "ok": not any(p.severity == "error" for p in mine),
                     "problems": [{"severity": p.severity, "message": p.message, "fix": p.fix} for p in mine]})
    return rows


def check_serving(folder: Path, base_folder: Path | None = None) -> list[dict]:
    """The readiness rows of ``folder``; a folder that cannot be read is not ready for anyone."""
    from .errors import MergerError

    base_sp = (base_folder / SENTENCEPIECE_MODEL).is_file() if base_folder else None
    try:
        facts = read_folder(folder)
    except MergerError as exc:
        return readiness([Problem(READERS, f"the folder cannot be read: {exc}", "fix or replace the file it names")])
    return readiness(check_folder(facts, base_sp))


def summary_line(rows: list[dict]) -> str:
    parts = []
    for row in rows:
        if row["ok"]:
            warn = [p for p in row["problems"] if p["severity"] == "warning"]
            parts.append(f"{row['reader']} ok" + (" (with a warning)" if warn else ""))
        else:
            parts.append(f"{row['reader']} NOT READY")
    return "serving: " + " · ".join(parts)
