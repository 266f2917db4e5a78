"""Facts about a tokenizer folder read from its JSON files: size, added tokens, chat template.

Read without transformers so inspection stays fast; a folder with only a sentencepiece or
tiktoken model falls back to transformers' AutoTokenizer for the length.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputFileError, MergerError
from .inputs import MAX_TOKENIZER_JSON_BYTES, confined, read_json, require_confined
from .keys import CHAT_TEMPLATE_DIR, PROCESSOR_FILES, TOKENIZER_FILES


@dataclass(frozen=True)
class TokenizerFacts:
    folder: str
    files: tuple[str, ...]
    length: int | None  # len(tokenizer): ids 0..length-1 exist when ids are dense
    max_id: int | None  # the largest id any token has
    added_tokens: tuple[tuple[int, str, bool], ...] = field(default=())  # (id, content, special)
    has_chat_template: bool = False
    source: str = "files"  # how the length was found
    complete: bool = True  # has its own vocabulary files (else only config files over another's vocabulary)
    # tokens that end generation: (id, content, why), e.g. the eos_token and a chat template's end of turn
    stop_tokens: tuple[tuple[int, str, str], ...] = field(default=())
    vocab_pieces: int | None = None  # the model's own vocabulary (tokenizer.json's model.vocab), added tokens aside

    @property
    def id_bound(self) -> int | None:
        """Rows the embedding needs so every id is in range."""
        if self.max_id is None:
            return self.length
        return max(self.length or 0, self.max_id + 1)


def tokenizer_files_in(folder: Path) -> list[str]:
    names = [n for n in TOKENIZER_FILES + PROCESSOR_FILES if (folder / n).is_file() and confined(folder, n, "tokenizer folder")]
    if (folder / CHAT_TEMPLATE_DIR).is_dir():
        names.append(CHAT_TEMPLATE_DIR)
    return names


VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "qwen.tiktoken", "tokenizer.tiktoken")


def has_vocabulary(folder: Path) -> bool:
    return any((folder / n).is_file() for n in VOCAB_FILES)


# a folder with any of these holds a tokenizer, whole or partial: some trainers save only
# added_tokens.json or special_tokens_map.json beside the adapter, which transformers reads on top
# of the base's vocabulary
TOKENIZER_MARKERS = VOCAB_FILES + ("tokenizer_config.json", "added_tokens.json", "special_tokens_map.json",
                                   "chat_template.jinja", "chat_template.json")


def has_tokenizer(folder: Path) -> bool:
    return any((folder / n).is_file() for n in TOKENIZER_MARKERS)


def _load_json(path: Path):
    """A tokenizer JSON file, confined to its folder; None when it is unreadable (inspection says
    the length is unknown rather than failing on a tokenizer the merge only copies)."""
    confined(path.parent, path.name, "tokenizer folder")
    try:
        return read_json(path, "tokenizer", max_bytes=MAX_TOKENIZER_JSON_BYTES)
    except MergerError:
        return None


# ids past len(tokenizer) a real tokenizer may have (reserved gaps); a crafted id far beyond would
# make the vocabulary decision allocate per row
MAX_ID_GAP = 65536


def read_tokenizer_facts(folder: Path, vocabulary_from: Path | None = None) -> TokenizerFacts | None:
    """Length, largest id and added tokens of the tokenizer in ``folder``; None if it has none.

    A folder with only tokenizer_config.json / special_tokens_map.json (some trainers save just
    those) is read on top of ``vocabulary_from``'s vocabulary files, which is how it is used.
    """
    facts = _read_facts(Path(folder), vocabulary_from)
    if facts is not None and facts.max_id is not None and facts.max_id >= (facts.length or 0) + MAX_ID_GAP:
        raise InputFileError(f"{folder}: its tokenizer gives a token the id {facts.max_id} but has only {facts.length or 'a few'} "
                             "tokens; ids that sparse are not a real tokenizer's: re-save it with tokenizer.save_pretrained")
    return facts


def _read_facts(folder: Path, vocabulary_from: Path | None) -> TokenizerFacts | None:
    if not has_tokenizer(folder):
        return None
    files = tuple(tokenizer_files_in(folder))
    complete = has_vocabulary(folder)
    if not complete and vocabulary_from is not None and has_vocabulary(Path(vocabulary_from)):
        under = _read_facts(Path(vocabulary_from), None)
        own = _read_facts(folder, None)
        added = dict((i, (c, s)) for i, c, s in under.added_tokens)
        added.update((i, (c, s)) for i, c, s in own.added_tokens)
        ids_beyond = [i for i in added if under.max_id is None or i > under.max_id]
        length = (under.length or 0) + len(ids_beyond)
        max_id = max([under.max_id or 0] + list(added))
        return TokenizerFacts(str(folder), files, length, max_id, tuple((i, c, s) for i, (c, s) in sorted(added.items())),
                              own.has_chat_template or under.has_chat_template, "files+base vocabulary", complete=False,
                              stop_tokens=own.stop_tokens or under.stop_tokens)
    source = "files"
    try:
        ids, added, config = _ids_from_files(folder)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        raise InputFileError(f"{folder}: its tokenizer files hold a malformed vocabulary or added-token entry; "
                             "re-save the tokenizer with tokenizer.save_pretrained") from None

    chat = isinstance(config, dict) and bool(config.get("chat_template"))
    chat = chat or (folder / "chat_template.json").is_file() or (folder / "chat_template.jinja").is_file()
    stops = stop_tokens(ids, added, config, chat_template_text(folder, config) if chat else "")

    all_ids = set(ids.values()) | set(added)
    if not complete:
        # config files only: the vocabulary lives elsewhere, so only the added ids are known
        added_sorted = tuple((i, c, s) for i, (c, s) in sorted(added.items()))
        return TokenizerFacts(str(folder), files, None, max(added) if added else None, added_sorted, chat, "config files only", False,
                              stop_tokens=stops)
    if not ids:
        length, max_id = _length_with_transformers(folder)
        source = "transformers"
        if length is None:
            return TokenizerFacts(str(folder), files, None, None, (), chat, "unknown", complete, stop_tokens=stops)
        all_ids = set(range(length)) | set(added)
        return TokenizerFacts(str(folder), files, max(len(all_ids), length), max(max_id, *all_ids),
                              tuple((i, c, s) for i, (c, s) in sorted(added.items())), chat, source, complete, stop_tokens=stops)
    # len(tokenizer) counts distinct tokens: vocabulary plus added tokens not already in it
    length = len(all_ids)
    added_sorted = tuple((i, c, s) for i, (c, s) in sorted(added.items()))
    return TokenizerFacts(str(folder), files, length, max(all_ids), added_sorted, chat, source, complete, stop_tokens=stops,
                          vocab_pieces=len(ids))


_END_OF_TURN = re.compile(r"end|eot|eos", re.IGNORECASE)


def stop_tokens(ids: dict[str, int], added: dict[int, tuple[str, bool]], config: dict | None,
                chat_text: str) -> tuple[tuple[int, str, str], ...]:
    """The tokens generation should stop on: the tokenizer's eos_token, and special tokens the chat
    template uses to end a turn (<|im_end|>, <|eot_id|>, <end_of_turn>)."""
    lookup = dict(ids)
    lookup.update((content, i) for i, (content, _) in added.items())
    found: dict[int, tuple[str, str]] = {}
    eos = config.get("eos_token") if isinstance(config, dict) else None
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if isinstance(eos, str) and eos in lookup:
        found[lookup[eos]] = (eos, "the tokenizer's eos_token")
    for i, (content, special) in sorted(added.items()):
        if special and i not in found and content and content in chat_text and _END_OF_TURN.search(content):
            found[i] = (content, "ends a turn in the chat template")
    return tuple((i, content, why) for i, (content, why) in found.items())


def chat_template_text(folder: Path, config: dict | None) -> str:
    """Every chat template the tokenizer folder holds, as one string (for finding the tokens it uses)."""
    parts = []
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, str):
        parts.append(template)
    elif isinstance(template, list):
        parts.extend(str(t.get("template", "")) for t in template if isinstance(t, dict))
    if (folder / "chat_template.jinja").is_file():
        path = confined(folder, "chat_template.jinja", "tokenizer folder")
        if path.stat().st_size <= MAX_TOKENIZER_JSON_BYTES:
            parts.append(path.read_text(encoding="utf-8", errors="replace"))
    if (folder / "chat_template.json").is_file():
        data = _load_json(folder / "chat_template.json")
        if isinstance(data, dict) and isinstance(data.get("chat_template"), str):
            parts.append(data["chat_template"])
    return "\n".join(parts)


def sentencepiece_size(path: Path) -> int | None:
    """Pieces in a SentencePiece model file, counted from its protobuf (field 1, repeated) without
    the sentencepiece package; None when the file is not one."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    position, pieces = 0, 0

    def varint(at: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            if at >= len(data) or shift > 63:
                raise ValueError("truncated varint")
            byte = data[at]
            value |= (byte & 0x7F) << shift
            at += 1
            if not byte & 0x80:
                return value, at
            shift += 7

    try:
        while position < len(data):
            tag, position = varint(position)
            field_number, wire = tag >> 3, tag & 7
            if wire == 0:
                _, position = varint(position)
            elif wire == 2:
                length, position = varint(position)
                position += length
                pieces += field_number == 1
            elif wire == 5:
                position += 4
            elif wire == 1:
                position += 8
            else:
                return None
        return pieces if position == len(data) and pieces else None
    except ValueError:
        return None


def _token_id(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or int(value) < 0:
        raise ValueError(value)
    return int(value)


def _ids_from_files(folder: Path) -> tuple[dict[str, int], dict[int, tuple[str, bool]], dict | None]:
    """Vocabulary ids, added tokens and tokenizer_config.json, from the tokenizer's JSON files."""
    ids: dict[str, int] = {}
    added: dict[int, tuple[str, bool]] = {}

    tok_json = _load_json(folder / "tokenizer.json") if (folder / "tokenizer.json").is_file() else None
    if isinstance(tok_json, dict):
        vocab = (tok_json.get("model") or {}).get("vocab")
        if isinstance(vocab, dict):
            ids.update(vocab)
        elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
            ids.update({str(entry[0]): i for i, entry in enumerate(vocab)})
        for token in tok_json.get("added_tokens") or []:
            added[_token_id(token["id"])] = (str(token["content"]), bool(token.get("special")))
    elif (folder / "vocab.json").is_file():
        vocab = _load_json(folder / "vocab.json")
        if isinstance(vocab, dict):
            ids.update(vocab)

    added_json = _load_json(folder / "added_tokens.json") if (folder / "added_tokens.json").is_file() else None
    if isinstance(added_json, dict):
        for content, idx in added_json.items():
            added.setdefault(_token_id(idx), (content, False))
    config = _load_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else None
    if isinstance(config, dict):
        for idx, token in (config.get("added_tokens_decoder") or {}).items():
            added.setdefault(_token_id(idx), (str(token.get("content", "")), bool(token.get("special"))))

    ids = {token: _token_id(i) for token, i in ids.items()}
    return ids, added, config


def _length_with_transformers(folder: Path) -> tuple[int | None, int]:
    require_confined(folder, "tokenizer folder")  # transformers opens what it likes in the folder
    try:
        from transformers import AutoTokenizer

        # explicit False: a tokenizer with an auto_map is refused instead of transformers asking on
        # stdin whether to run its code (counting tokens never runs code from an input)
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception:  # any loader failure just means "unknown"; inspection reports it
        return None, -1
    return len(tok), len(tok) - 1
