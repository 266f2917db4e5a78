"""Pure vocabulary arithmetic: how many rows the embedding and the head must have, and why.

The adapter's own tensors are the evidence; the tokenizer only explains them (or, when the
adapter saved no rows at all, gives the size). Inputs are plain ints so every rule is testable
on paper.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import IncompatibleError

PAD_MULTIPLES = (8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class Evidence:
    rows: int
    what: str  # e.g. "lm_head.weight (modules_to_save)"
    exact: bool = True  # False: a lower bound (trainable-token indices)


@dataclass(frozen=True)
class VocabDecision:
    name: str  # short module name for messages, e.g. "embed_tokens"
    base_rows: int
    rows: int
    tokenizer_len: int | None
    source: str  # "adapter" | "tokenizer" | "other side" | "base"
    story: str
    supplied_rows: tuple[int, ...] | None = None  # new rows whose values the adapter supplies; None = all
    notes: tuple[str, ...] = field(default=())

    @property
    def changed(self) -> bool:
        return self.rows != self.base_rows

    @property
    def grown_rows(self) -> range:
        return range(self.base_rows, self.rows) if self.rows > self.base_rows else range(0)

    @property
    def untrained_new_rows(self) -> list[int]:
        """Grown rows whose values nobody trained (filled by the new-rows rule)."""
        if self.supplied_rows is None:
            return []
        supplied = set(self.supplied_rows)
        return [r for r in self.grown_rows if r not in supplied]


def pad_multiple(rows: int, tokens: int) -> int | None:
    """The smallest usual multiple that rounds ``tokens`` up to exactly ``rows``."""
    if rows <= tokens:
        return None
    for multiple in PAD_MULTIPLES:
        if -(-tokens // multiple) * multiple == rows:
            return multiple
    return None


def round_up(value: int, multiple: int | None) -> int:
    return value if not multiple else -(-value // multiple) * multiple


def explain_rows(rows: int, tokens: int | None) -> str:
    """'80 rows = 65 tokens padded to a multiple of 16', or the honest alternative."""
    if tokens is None:
        return f"{rows} rows (no tokenizer to compare with)"
    if rows == tokens:
        return f"{rows} rows = {tokens} tokens"
    if rows > tokens:
        multiple = pad_multiple(rows, tokens)
        if multiple:
            return f"{rows} rows = {tokens} tokens padded to a multiple of {multiple}"
        return f"{rows} rows for {tokens} tokens ({rows - tokens} spare rows)"
    return f"{rows} rows for {tokens} tokens (ids {rows}-{tokens - 1} have no row)"


def _exact_rows(name: str, evidence: list[Evidence]) -> int | None:
    exact = [e for e in evidence if e.exact]
    sizes = sorted({e.rows for e in exact})
    if len(sizes) > 1:
        detail = ", ".join(f"{e.what}: {e.rows}" for e in exact)
        raise IncompatibleError(f"{name}: the adapter's tensors disagree on the vocabulary rows ({detail}); the adapter files are inconsistent, re-save it")
    return sizes[0] if sizes else None


def decide_side(name: str, base_rows: int, evidence: list[Evidence], tokenizer_len: int | None,
                pad_to_multiple_of: int | None, supplied_rows: tuple[int, ...] | None,
                base_tokenizer_len: int | None = None) -> VocabDecision:
    """Rows for one of embedding/head from its own evidence (or None-evidence fallback rules).

    Without evidence in the tensors, only tokens added in training grow the matrix: ids the base's
    own tokenizer already had beyond its rows (Gemma 3's text models: 262145 ids, 262144 rows)
    were never given rows, so training did not need them either.
    """
    exact = _exact_rows(name, evidence)
    base_note = f"(base: {base_rows})"
    if exact is not None:
        story = f"{name}: {explain_rows(exact, tokenizer_len)} {base_note}, from the adapter's tensors"
        if exact < base_rows:
            story += f"; the base shrinks by {base_rows - exact} rows because the adapter's tensors are smaller"
        unsaved = [] if supplied_rows is None else [r for r in range(base_rows, exact) if r not in supplied_rows]
        notes = ()
        if unsaved:  # e.g. LoRA on the layer saved without save_embedding_layers: an update, no values
            story += f"; the adapter saved no values for rows {_span(unsaved)} (only updates), so they start from the new-rows rule"
            notes = (f"{name}: rows {_span(unsaved)} start from the new-rows rule: the adapter saved no values for them",)
        return VocabDecision(name, base_rows, exact, tokenizer_len, "adapter", story, supplied_rows, notes)

    bound = max([e.rows for e in evidence] + [tokenizer_len or 0])
    inherited = bool(tokenizer_len and base_tokenizer_len and tokenizer_len <= base_tokenizer_len)
    if inherited and not evidence and bound > base_rows:
        story = (f"{name}: {base_rows} rows kept ({tokenizer_len} tokens, as in the base's own tokenizer: "
                 f"ids {_span(list(range(base_rows, tokenizer_len)))} have no row in the base either, and training added none)")
        return VocabDecision(name, base_rows, base_rows, tokenizer_len, "base", story, supplied_rows)
    if bound <= base_rows:
        story = f"{name}: {base_rows} rows kept"
        if tokenizer_len is not None and tokenizer_len < base_rows:
            story += f" ({explain_rows(base_rows, tokenizer_len)}; the base's spare rows are kept, never shrunk)"
        elif tokenizer_len is not None:
            story += f" ({tokenizer_len} tokens)"
        return VocabDecision(name, base_rows, base_rows, tokenizer_len, "base", story, supplied_rows)

    rows = round_up(bound, pad_to_multiple_of)
    why = "the adapter's tokenizer" if tokenizer_len == bound else "the trainable-token indices"
    story = f"{name}: {explain_rows(rows, tokenizer_len)} {base_note}, sized from {why}"
    untrained = [r for r in range(base_rows, rows) if supplied_rows is None or r not in supplied_rows]
    note = ()
    if supplied_rows is None or untrained:
        story += f"; the adapter saved no values for rows {_span(untrained)}: never trained, filled by the new-rows rule"
        note = (f"{name}: rows {_span(untrained)} were never trained by this adapter",)
    return VocabDecision(name, base_rows, rows, tokenizer_len, "tokenizer", story,
                         supplied_rows if supplied_rows is not None else (), note)


def follow_other_side(name: str, base_rows: int, other: VocabDecision, tokenizer_len: int | None,
                      supplied_rows: tuple[int, ...] | None, extra_rows: int = 0) -> VocabDecision:
    """A side with no evidence of its own grows with the other: training resized both together.

    ``extra_rows``: how many rows this side has beyond the other by the model's design (Mllama's
    embedding holds vocab_size + 8 rows, its head vocab_size): kept as the base has it.
    """
    rows = other.rows + extra_rows
    story = f"{name}: {explain_rows(rows, tokenizer_len)} (base: {base_rows}), grown with {other.name}"
    untrained = [r for r in range(base_rows, rows) if not supplied_rows or r not in supplied_rows]
    notes = ()
    if untrained:
        story += f"; the adapter saved no {name} values for rows {_span(untrained)}: never trained, filled by the new-rows rule"
        notes = (f"{name}: rows {_span(untrained)} were never trained by this adapter",)
    return VocabDecision(name, base_rows, rows, tokenizer_len, "other side", story, supplied_rows or (), notes)


def _span(rows: list[int]) -> str:
    if not rows:
        return "none"
    if rows == list(range(rows[0], rows[-1] + 1)):
        return f"{rows[0]}-{rows[-1]}" if len(rows) > 1 else str(rows[0])
    return ", ".join(map(str, rows[:8])) + (" ..." if len(rows) > 8 else "")
