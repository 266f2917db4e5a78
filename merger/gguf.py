"""merge-adapter gguf: check a GGUF against the merged folder it was converted from.

The GGUF is read back with the optional ``gguf`` package (llama.cpp's converter itself runs from
merger.llama_cpp) and compared with the folder's own facts, the vocabulary mistakes a merge with a resized
vocabulary invites first of all: a token list shorter than the embedding (32002 tokens for 32064
rows), added tokens missing or typed wrong, BOS/EOS moved. Facts are read by ``read_*``; the
comparison, :func:`compare_facts`, is pure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError, InputFileError, InputNotFoundError, MissingDependencyError
from .inputs import MAX_TOKENIZER_JSON_BYTES, confined, input_files, read_json, short
from .keys import CONFIG, GENERATION_CONFIG, SAFE_INDEX

INSTALL_HINT = "pip install 'merger[gguf]'"

# llama.cpp's token types (gguf.TokenType), by value, so the pure checks need no gguf package
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
TYPE_NAMES = {NORMAL: "NORMAL", UNKNOWN: "UNKNOWN", CONTROL: "CONTROL", USER_DEFINED: "USER_DEFINED",
              UNUSED: "UNUSED", BYTE: "BYTE"}

# the input embedding of the text model, by the module names transformers' architectures use
EMBEDDING_NAMES = ("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight", "tok_embeddings.weight")
NOT_TEXT = ("vision", "visual", "audio", "image")


# ---------------------------------------------------------------- facts


@dataclass(frozen=True)
class GgufFacts:
    """What a GGUF file says about its vocabulary."""

    path: str
    tokens: tuple[str, ...] | None  # tokenizer.ggml.tokens; None when absent
    token_types: tuple[int, ...] | None  # tokenizer.ggml.token_type
    bos_id: int | None
    eos_id: int | None
    embedding_shape: tuple[int, ...] | None  # token_embd.weight, rows first (as torch has it)
    architecture: str | None = None


@dataclass(frozen=True)
class ModelFacts:
    """What the merged folder says: embedding rows, added tokens, where BOS and EOS are set."""

    folder: str
    embedding: str  # the input embedding's tensor name
    embedding_shape: tuple[int, ...]
    added_tokens: tuple[tuple[int, str, bool], ...] = ()  # (id, content, special)
    # (where it is set, the ids it allows): generation_config.json may list several eos ids
    bos: tuple[tuple[str, tuple[int, ...]], ...] = ()
    eos: tuple[tuple[str, tuple[int, ...]], ...] = ()
    no_added_tokens: str = "the folder's tokenizer has no added tokens"  # why added_tokens is empty


@dataclass(frozen=True)
class GgufCheck:
    name: str
    status: str  # "ok", "FAIL" or "skip"
    message: str
    code: str | None = None  # stable finding code when it failed, e.g. "wrong-token-count"


@dataclass
class GgufReport:
    gguf: str
    folder: str
    checks: list[GgufCheck] = field(default_factory=list)
    command: list[str] | None = None  # the converter run that wrote the GGUF, if this run did

    @property
    def findings(self) -> list[GgufCheck]:
        return [c for c in self.checks if c.status == "FAIL"]

    @property
    def ok(self) -> bool:
        return not self.findings

    def summary(self) -> str:
        failed = len(self.findings)
        verdict = "all passed" if not failed else f"{failed} FAILED"
        return f"gguf {self.gguf} against {self.folder}: {len(self.checks)} checks, {verdict}"

    def to_dict(self) -> dict:
        return {"ok": self.ok, "gguf": self.gguf, "folder": self.folder, "command": self.command,
                "checks": [{"name": c.name, "status": c.status, "message": c.message, "code": c.code} for c in self.checks],
                "findings": [{"code": c.code, "message": c.message} for c in self.findings]}

    def __repr__(self) -> str:
        return report_text(self)


def report_text(report: GgufReport) -> str:
    """One row per check, in the order they ran, then nothing else."""
    lines = [report.summary()]
    for c in report.checks:
        label = f"FAIL [{c.code}]" if c.status == "FAIL" else c.status
        lines.append(f"  {label}: {c.name}: {c.message}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the pure comparison


def looks_special(text: str) -> bool:
    """llama.cpp's converter (``does_token_look_special``) types these CONTROL even when the
    tokenizer calls them non-special (Qwen2.5's <|fim_prefix|>): a rule of llama.cpp's, not a slip."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _first(items: list[str], count: int = 3) -> str:
    more = f" (and {len(items) - count} more)" if len(items) > count else ""
    return "; ".join(items[:count]) + more


def compare_facts(gguf: GgufFacts, model: ModelFacts) -> list[GgufCheck]:
    """Check a GGUF's vocabulary against the folder it was converted from; one row per check."""
    name = Path(gguf.path).name
    rows = model.embedding_shape[0]
    checks = [_check_token_count(gguf, model, name, rows)]
    checks += _check_added_tokens(gguf, model, name)
    checks.append(_check_special_id("bos", gguf.bos_id, model.bos, name, gguf.tokens))
    checks.append(_check_special_id("eos", gguf.eos_id, model.eos, name, gguf.tokens))
    checks.append(_check_embedding(gguf, model, name))
    return checks


def _check_token_count(gguf: GgufFacts, model: ModelFacts, name: str, rows: int) -> GgufCheck:
    what = "token count"
    if gguf.tokens is None:
        return GgufCheck(what, "FAIL", f"{name} has no tokenizer.ggml.tokens, {model.folder}'s {model.embedding} has {rows} rows; "
                         "llama.cpp cannot run it: convert again without --no-vocab", "wrong-token-count")
    count = len(gguf.tokens)
    if count == rows:
        return GgufCheck(what, "ok", f"{count} tokens = {rows} rows of {model.embedding}")
    gguf_rows = gguf.embedding_shape[0] if gguf.embedding_shape else None
    if count < rows and gguf_rows == rows:
        why = (f"the converter counted the tokenizer's {count} tokens, not the {rows} rows the embedding was padded to "
               f"(config.json's vocab_size); llama.cpp sizes token_embd.weight from the token list and refuses the file "
               f"(token_embd.weight has wrong shape): for a SentencePiece model, `merge-adapter validate {model.folder} --repair "
               f"--base BASE` writes the base's tokenizer.model beside it (the converter then pads to the rows itself); "
               f"otherwise pad the folder's tokenizer to {rows} tokens with {rows - count} placeholder "
               f"additional_special_tokens (<|unused_0|>, ...); then convert again")
    elif count > rows:
        why = f"ids {rows} and up have no embedding row: this GGUF was not converted from {model.folder}; convert it again"
    else:
        why = f"this GGUF was not converted from {model.folder}; convert it again"
    return GgufCheck(what, "FAIL", f"{name} has {count} tokens, {model.folder}'s {model.embedding} {rows} rows "
                     f"(expected {rows} tokens): {why}", "wrong-token-count")


def _same_text(gguf_text: str, content: str, special: bool) -> bool:
    # the converter writes a non-special token's SentencePiece spaces (U+2581) as plain spaces,
    # as llama.cpp matches user-defined tokens against raw text
    return gguf_text == content or (not special and gguf_text == content.replace("\u2581", " "))


def _check_added_tokens(gguf: GgufFacts, model: ModelFacts, name: str) -> list[GgufCheck]:
    added = model.added_tokens
    if not added:
        note = model.no_added_tokens
        return [GgufCheck("added tokens", "skip", note), GgufCheck("added token types", "skip", note)]
    tokens, types = gguf.tokens or (), gguf.token_types
    wrong, padding = [], False
    for i, content, special in added:
        if i >= len(tokens):
            wrong.append(f"id {i} {short(content, 40)} is past the GGUF's {len(tokens)} tokens")
        elif not _same_text(tokens[i], content, special):
            padding = padding or tokens[i].startswith("[PAD")
            wrong.append(f"id {i} holds {short(tokens[i], 40)} where the tokenizer has {short(content, 40)}")
    if not wrong:
        text_check = GgufCheck("added tokens", "ok", f"{len(added)} at their ids with their text (ids {added[0][0]}..{added[-1][0]})")
    else:
        fix = ("the converter left them as padding: it did not read the added tokens (its SentencePiece path reads only "
               "added_tokens.json and tokenizer_config.json's added_tokens_decoder, not tokenizer.json): list them in "
               "tokenizer_config.json's added_tokens_decoder, as transformers 4 saved them, then convert again" if padding
               else "the GGUF's tokenizer is not the folder's: convert the folder again")
        text_check = GgufCheck("added tokens", "FAIL", f"{len(wrong)} of {len(added)} added tokens differ in {name}: "
                               f"{_first(wrong)}; {fix}", "wrong-added-token")
    # a token whose text is wrong is one finding already; its type is not checked again
    right = tuple(t for t in added if t[0] < len(tokens) and _same_text(tokens[t[0]], t[1], t[2]))
    return [text_check, _check_token_types(types, right, name, len(tokens), len(added) - len(right))]


def _check_token_types(types: tuple[int, ...] | None, added, name: str, count: int, unchecked: int) -> GgufCheck:
    what = "added token types"
    if types is None:
        return GgufCheck(what, "FAIL", f"{name} has no tokenizer.ggml.token_type; convert it again", "wrong-token-type")
    if len(types) != count:
        return GgufCheck(what, "FAIL", f"{name} has {len(types)} token types for {count} tokens; convert it again", "wrong-token-type")
    wrong, by_rule = [], []
    for i, content, special in added:
        kind = types[i]
        if special and kind not in (CONTROL, UNKNOWN):  # UNKNOWN: the <unk> token, special to llama.cpp too
            wrong.append(f"id {i} {short(content, 40)}: {TYPE_NAMES.get(kind, kind)}, expected CONTROL (special in the tokenizer)")
        elif not special and kind != USER_DEFINED:
            if kind == CONTROL and looks_special(content):
                by_rule.append(content)
            else:
                wrong.append(f"id {i} {short(content, 40)}: {TYPE_NAMES.get(kind, kind)}, expected USER_DEFINED (not special in the tokenizer)")
    if wrong:
        return GgufCheck(what, "FAIL", f"{len(wrong)} added tokens of {name} have the wrong type: {_first(wrong)}; "
                         "llama.cpp hides CONTROL tokens in its output and shows USER_DEFINED ones, unlike this tokenizer: "
                         "the converter took 'special' from elsewhere (from a Llama tokenizer.json, only the named special "
                         "tokens: bos, eos, unk, pad, additional_special_tokens); make the tokenizer say it there, then "
                         "convert again", "wrong-token-type")
    special = sum(1 for _, _, s in added if s)
    message = f"{special} special = CONTROL, {len(added) - special} non-special = USER_DEFINED"
    if unchecked:
        message += f" ({unchecked} with the wrong text not checked)"
    if by_rule:
        message += (f"; {len(by_rule)} non-special typed CONTROL by llama.cpp's rule for tokens that look special "
                    f"({_first([repr(t) for t in by_rule])}): hidden in llama.cpp's output, shown by transformers")
    return GgufCheck(what, "ok", message)


def _check_special_id(kind: str, found: int | None, expected, name: str, tokens) -> GgufCheck:
    what = f"{kind} id"
    if not expected:
        return GgufCheck(what, "skip", f"the folder sets no {kind} token")
    sources = ", ".join(where for where, _ in expected)
    if found is None:
        ids = " / ".join(str(ids[0] if len(ids) == 1 else list(ids)) for _, ids in expected)
        return GgufCheck(what, "FAIL", f"{name} has no tokenizer.ggml.{kind}_token_id; the folder sets {ids} ({sources}): "
                         "convert it again", f"wrong-{kind}-id")
    disagree = [f"{where} says {ids[0] if len(ids) == 1 else list(ids)}" for where, ids in expected if found not in ids]
    if disagree:
        held = f" ({short(tokens[found], 40)})" if tokens and found < len(tokens) else ""
        common = [i for i in expected[0][1] if all(i in ids for _, ids in expected)]
        fix = (f"set it in place with llama.cpp's gguf-py/gguf/scripts/gguf_set_metadata.py {name} tokenizer.ggml.{kind}_token_id {common[0]}"
               if common else "the folder's own files disagree: make them agree, then convert again")
        return GgufCheck(what, "FAIL", f"{name} has {kind} id {found}{held}, but {'; '.join(disagree)}: llama.cpp would "
                         f"{'begin with' if kind == 'bos' else 'stop on'} another token than transformers; {fix}", f"wrong-{kind}-id")
    return GgufCheck(what, "ok", f"{found} ({sources})")


def _check_embedding(gguf: GgufFacts, model: ModelFacts, name: str) -> GgufCheck:
    what = "token_embd.weight"
    expected = tuple(model.embedding_shape)
    if gguf.embedding_shape is None:
        return GgufCheck(what, "FAIL", f"{name} has no token_embd.weight (expected {list(expected)} from {model.embedding}): "
                         "convert the folder again", "wrong-embedding-shape")
    if tuple(gguf.embedding_shape) != expected:
        return GgufCheck(what, "FAIL", f"{name}'s token_embd.weight is {list(gguf.embedding_shape)}, {model.folder}'s "
                         f"{model.embedding} {list(expected)}: it was not converted from this folder; convert it again",
                         "wrong-embedding-shape")
    return GgufCheck(what, "ok", f"{list(expected)} = {model.embedding}")


# ---------------------------------------------------------------- reading the facts


def import_gguf():
    """The optional ``gguf`` package, or a one-line error saying how to install it."""
    try:
        import gguf
    except ImportError as exc:
        if exc.name not in (None, "gguf"):  # gguf 0.10.0 imports sentencepiece without requiring it
            raise MissingDependencyError(f"merge-adapter gguf: the gguf package cannot be imported (no module named "
                                         f"{exc.name!r}); pip install -U 'merger[gguf]'") from None
        raise MissingDependencyError(f"merge-adapter gguf: reading a GGUF file needs the gguf package, which is not "
                                     f"installed; {INSTALL_HINT}") from None
    return gguf


def read_gguf_facts(path: str | Path) -> GgufFacts:
    """Tokens, token types, BOS/EOS ids and token_embd.weight's shape from a GGUF file's header."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"GGUF file {path}: does not exist; pass the .gguf file the converter wrote")
    gguf = import_gguf()
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError, struct errors, IndexError... for a bad file
        raise InputFileError(f"{path}: not a readable GGUF file ({short(str(exc), 120)}); convert it again") from None

    def field_value(key: str):
        entry = reader.fields.get(key)
        if entry is None or not entry.data:
            return None
        return entry.parts[entry.data[0]][0].item()

    def string_array(key: str) -> tuple[str, ...] | None:
        entry = reader.fields.get(key)
        if entry is None:
            return None
        return tuple(bytes(entry.parts[i]).decode("utf-8", errors="replace") for i in entry.data)

    def int_array(key: str) -> tuple[int, ...] | None:
        entry = reader.fields.get(key)
        if entry is None:
            return None
        return tuple(int(entry.parts[i][0]) for i in entry.data)

    arch = reader.fields.get("general.architecture")
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    return GgufFacts(
        path=str(path),
        tokens=string_array("tokenizer.ggml.tokens"),
        token_types=int_array("tokenizer.ggml.token_type"),
        bos_id=field_value("tokenizer.ggml.bos_token_id"),
        eos_id=field_value("tokenizer.ggml.eos_token_id"),
        # ggml lists dimensions innermost first: [hidden, rows]
        embedding_shape=tuple(int(d) for d in reversed(list(embedding.shape))) if embedding is not None else None,
        architecture=bytes(arch.parts[arch.data[0]]).decode("utf-8", errors="replace") if arch is not None else None,
    )


def _is_embedding(key: str) -> bool:
    return any(key == n or key.endswith("." + n) for n in EMBEDDING_NAMES) and not any(w in key for w in NOT_TEXT)


def pick_embedding(shapes: dict[str, tuple[int, ...]], vocab_size: int | None) -> str | None:
    """The text model's input embedding among a checkpoint's tensors: the one with vocab_size rows
    when several match, else the shortest name (``model.embed_tokens`` before a nested one)."""
    found = [k for k in shapes if _is_embedding(k) and len(shapes[k]) == 2]
    exact = [k for k in found if vocab_size is not None and shapes[k][0] == vocab_size]
    return min(exact or found, key=lambda k: (len(k), k)) if found else None


def _embedding_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    from .tensors import read_safetensors_header

    index_path = folder / SAFE_INDEX
    if index_path.is_file():
        index = read_json(confined(folder, SAFE_INDEX, "merged folder", CheckpointError), "shard index", CheckpointError)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index_path}: has no weight_map of tensor names to file names; re-save the checkpoint")
        names = sorted({weight_map[k] for k in weight_map if _is_embedding(k)})
        files = [confined(folder, n, f"{SAFE_INDEX} of", CheckpointError) for n in names]
    else:
        files = input_files(folder, "merged folder", CheckpointError, "*.safetensors")
    shapes = {}
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"{folder}: {path.name} is listed in {SAFE_INDEX} but missing; re-save the checkpoint")
        shapes.update({k: m.shape for k, m in read_safetensors_header(path).items() if _is_embedding(k)})
    return shapes


def _json_if_present(folder: Path, name: str, what: str, max_bytes: int | None = None):
    if not (folder / name).is_file():
        return None
    path = confined(folder, name, "merged folder", InputFileError)
    kwargs = {"max_bytes": max_bytes} if max_bytes else {}
    return read_json(path, what, InputFileError, **kwargs)


def _token_ids(folder: Path, added: tuple[tuple[int, str, bool], ...]) -> Callable[[str], int | None]:
    """content -> id: the added tokens first, then tokenizer.json's vocabulary (read only if needed)."""
    lookup = {content: i for i, content, _ in added}
    vocab: dict | None = None

    def find(content: str) -> int | None:
        nonlocal vocab
        if content in lookup:
            return lookup[content]
        if vocab is None:
            data = _json_if_present(folder, "tokenizer.json", "tokenizer", MAX_TOKENIZER_JSON_BYTES)
            model = data.get("model") if isinstance(data, dict) else None
            vocab = model.get("vocab") if isinstance(model, dict) and isinstance(model.get("vocab"), dict) else {}
        value = vocab.get(content)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    return find


def _special_sources(folder: Path, kind: str, token_id: Callable[[str], int | None]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    sources = []
    config = _json_if_present(folder, "tokenizer_config.json", "tokenizer config")
    entry = config.get(f"{kind}_token") if isinstance(config, dict) else None
    entry = entry.get("content") if isinstance(entry, dict) else entry
    if isinstance(entry, str) and entry:
        found = token_id(entry)
        if found is not None:
            sources.append((f"tokenizer_config.json {kind}_token {entry!r}", (found,)))
    generation = _json_if_present(folder, GENERATION_CONFIG, "generation config")
    value = generation.get(f"{kind}_token_id") if isinstance(generation, dict) else None
    ids = [value] if isinstance(value, int) else value if isinstance(value, list) else []
    ids = tuple(i for i in ids if isinstance(i, int) and not isinstance(i, bool))
    if ids:
        sources.append((f"{GENERATION_CONFIG} {kind}_token_id", ids))
    return tuple(sources)


def read_model_facts(folder: str | Path) -> ModelFacts:
    """The merged folder's side: embedding shape from the safetensors headers, the tokenizer's
    added tokens, and the BOS/EOS ids its tokenizer_config.json and generation_config.json set."""
    from .tokenizer_facts import read_tokenizer_facts

    folder = Path(folder)
    if not folder.is_dir():
        raise InputNotFoundError(f"merged folder {folder}: does not exist; pass the folder merge-adapter wrote")
    config = _json_if_present(folder, CONFIG, "config") or {}
    text = next((config[k] for k in ("text_config", "llm_config", "language_config") if isinstance(config.get(k), dict)), config)
    vocab_size = text.get("vocab_size") if isinstance(text.get("vocab_size"), int) else config.get("vocab_size")
    shapes = _embedding_shapes(folder)
    embedding = pick_embedding(shapes, vocab_size if isinstance(vocab_size, int) else None)
    if embedding is None:
        raise CheckpointError(f"{folder}: no input embedding ({', '.join(EMBEDDING_NAMES)}) in its safetensors files; "
                              "pass a merged checkpoint folder with safetensors weights")
    tokenizer = read_tokenizer_facts(folder)
    added = tuple(tokenizer.added_tokens) if tokenizer is not None else ()
    token_id = _token_ids(folder, added)
    why = ("the folder has no tokenizer" if tokenizer is None
           else "merger cannot read the folder's tokenizer here (transformers cannot load it)" if tokenizer.source == "unknown"
           else "the folder's tokenizer has no added tokens")
    return ModelFacts(str(folder), embedding, tuple(shapes[embedding]), added,
                      _special_sources(folder, "bos", token_id), _special_sources(folder, "eos", token_id), why)


def check_gguf(gguf_path: str | Path, folder: str | Path, model: ModelFacts | None = None) -> GgufReport:
    """Read both sides (``model``: the folder's facts, when already read) and compare them; nothing is written."""
    model = model if model is not None else read_model_facts(folder)
    facts = read_gguf_facts(gguf_path)
    return GgufReport(str(gguf_path), str(folder), compare_facts(facts, model))
