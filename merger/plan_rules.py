"""Rules plan_merge applies that need no state of its own: refusals found in the base (quantized
weights, shapes its config contradicts), which saved copy of a layer PEFT loads, the tokenizer
written to OUT, and the wording that points users at the model an adapter was trained on.
Pure: facts in, decisions or messages out."""

from __future__ import annotations

import re
from collections import Counter

from .adapter import AdapterInfo
from .checkpoint import CheckpointInfo
from .errors import IncompatibleError
from .keys import full_precision_name
from .layout import ModelLayout
from .options import MergeOptions


def embed_extra_rows(layout: ModelLayout, embed_w: str | None, head_w: str | None) -> int:
    """Rows the model's class gives its embedding beyond its head, read off the meta model built
    from config.json (Mllama: nn.Embedding(vocab_size + 8, ...) beside a vocab_size-row head)."""
    if not embed_w or not head_w or embed_w not in layout.param_shapes or head_w not in layout.param_shapes:
        return 0
    return layout.param_shapes[embed_w][0] - layout.param_shapes[head_w][0]


def base_shape_problems(base: CheckpointInfo, layout: ModelLayout) -> list[str]:
    """Base tensors whose shapes disagree with the model its config.json describes.

    The vocabulary dimension is exempt: the rows are read from the tensors themselves and the
    config's vocab_size follows them.
    """
    vocab_params = {f"{m}.{p}" for m in (layout.embed_module, layout.head_module) if m for p in ("weight", "bias")}
    model_keys = [layout.to_model_key.get(key, key) for key in base.tensors]
    fused = {k for k, n in Counter(model_keys).items() if n > 1}  # per-expert tensors transformers stacks on load
    wrong = []
    for (key, meta), model_key in zip(base.tensors.items(), model_keys, strict=True):
        expected = layout.param_shapes.get(model_key)
        if expected is None or model_key in fused or tuple(meta.shape) == tuple(expected):
            continue
        if model_key in vocab_params and tuple(meta.shape[1:]) == tuple(expected[1:]):
            continue
        wrong.append(f"{key} {list(meta.shape)} (config: {list(expected)})")
    # a weight stored as integers is not a weight (a float tensor relabelled I32 is a valid file that
    # would be copied bit for bit): buffers such as position_ids may be integers, parameters may not
    integer = [f"{key} ({meta.dtype})" for (key, meta), model_key in zip(base.tensors.items(), model_keys, strict=True)
               if model_key in layout.parameters and meta.dtype.startswith(("I", "U", "BOOL"))]
    problems = [f"{base.folder}: {', '.join(integer[:2])}{' ...' if len(integer) > 2 else ''} stored as integers, but the model "
                "holds floating-point weights there; the checkpoint is corrupt or quantized without a quantization_config: "
                "re-download the base"] if integer else []
    if not wrong:
        return problems
    count = "1 base tensor does not have the shape" if len(wrong) == 1 else f"{len(wrong)} base tensors do not have the shapes"
    return problems + [f"{base.folder}: {count} its config.json describes "
                       f"({'; '.join(wrong[:2])}{' ...' if len(wrong) > 2 else ''}); the weights belong to another model size: "
                       "put the matching config.json beside them or re-download the base"]


def prefer(first: str, second: str) -> tuple[str, str]:
    """Of two saved copies of one module's weight, the one PEFT loads into the trained module."""
    rank = lambda k: 0 if ".modules_to_save." in k else 1  # noqa: E731
    return (first, second) if rank(first) <= rank(second) else (second, first)


def quantization_problem(base: CheckpointInfo, adapter: AdapterInfo) -> str | None:
    """Why a quantized base cannot be merged into, or None.

    Block-FP8, per-tensor FP8 and MXFP4 bases are dequantized by the format's definition and merged in
    bfloat16 (dequantization_edits says so); their files must fit together (quantized.py's checks).
    Other methods (bitsandbytes, GPTQ, AWQ, ...) are refused: the update would be rounded into 4/8-bit
    weights, and their dequantization depends on the quantization library.
    """
    if base.quantized is not None:
        return f"{base.folder}: {base.quantized.problem}" if base.quantized.problem else None
    quant = base.quantization_config
    if not quant:
        return None
    method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else "unknown"
    bits = "4-bit" if isinstance(quant, dict) and quant.get("load_in_4bit") else ("8-bit" if isinstance(quant, dict) and quant.get("load_in_8bit") else "")
    name = str(adapter.config.get("base_model_name_or_path") or base.folder.name)
    full = full_precision_name(name)
    hint = f" (e.g. {full})" if full else ""
    return (f"{base.folder}: the base is quantized ({method} {bits}".rstrip() + "); merging into quantized weights rounds the "
            f"adapter's update away and needs the quantization library; merge into the full-precision model{hint} "
            "that the quantized one was made from")


def dequantization_edits(base: CheckpointInfo, dtype: str) -> tuple[dict, str | None]:
    """For a base merger dequantizes: the config edits (quantization_config removed at every level it
    is, the output dtype) and the note that says what was done; ({}, None) for any other base.

    A None edit removes the key (outputs.merged_config): the output holds full-precision weights, and a
    quantization_config left behind would make every loader look for scales that are not there.
    """
    if base.quantized is None or base.quantized.problem:
        return {}, None
    edits: dict = {}
    key = base.text_config_key
    for prefix, level in [("", base.config)] + ([(f"{key}.", base.config[key])] if key else []):
        if "quantization_config" in level:
            edits[f"{prefix}quantization_config"] = None
        for name in ("dtype", "torch_dtype"):
            if name in level:
                edits[f"{prefix}{name}"] = dtype
    edits["dtype"] = dtype
    view = base.quantized
    count = len(view.dequantized)
    note = (f"dequantized {view.description} to {dtype} by the format's definition ({count} "
            f"tensor{'s' if count != 1 else ''}, every stored tensor read once); quantization_config removed: the output "
            "is a full-precision checkpoint, never quantized values with the update folded in")
    partial = view.partial_blocks
    if partial:
        note += (f"; {len(partial)} tensors end in partial blocks (e.g. {partial[0]} {list(base.tensors[partial[0]].shape)}), "
                 "which transformers' load-time dequantization cuts by the scale grid instead: the peft engine and the "
                 "logits reference load merger's values")
    return edits, note


def is_module_copy(key: str, module: str | None, modules_to_save: list[str]) -> bool:
    """Whether a full weight is a modules_to_save copy (trained beside the base layer) rather than
    the base layer itself (saved by save_embedding_layers or as LoRA's base_layer)."""
    if ".modules_to_save." in key:
        return True
    if ".base_layer." in key or not module:
        return False
    return any(module == name or module.endswith("." + name) for name in modules_to_save)


def unmatched_targets(targets, layout: ModelLayout) -> list[str]:
    """Config target_modules names (PEFT's suffix rule) or regex that match no module of the base."""
    if not targets or targets == "all-linear":
        return []
    names = list(layout.modules)
    if isinstance(targets, str):
        return [] if any(re.fullmatch(targets, n) for n in names) else [targets]
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]


def trained_on(adapter: AdapterInfo) -> str:
    trained = adapter.config.get("base_model_name_or_path")
    return f"the adapter was trained on {trained}; merge it into that model" if trained else "merge it into the model it was trained on"


def choose_tokenizer(base: CheckpointInfo, adapter: AdapterInfo, options: MergeOptions) -> tuple[str | None, str]:
    choice = options.tokenizer
    if choice == "adapter" or (choice == "auto" and adapter.tokenizer):
        if not adapter.tokenizer:
            raise IncompatibleError(f"{adapter.folder}: --tokenizer adapter was asked for but the adapter folder has no tokenizer files")
        where = "the adapter folder" if adapter.tokenizer.folder == str(adapter.folder) else f"{adapter.tokenizer.folder}, beside the named adapter,"
        if not adapter.tokenizer.complete:
            return adapter.tokenizer.folder, f"{where} has tokenizer config files without a vocabulary: they are written over the base's tokenizer files"
        return adapter.tokenizer.folder, f"{where} has the tokenizer used in training"
    if choice in ("base", "auto"):
        if base.tokenizer:
            return base.tokenizer.folder, "the adapter folder has no tokenizer, so the base's is kept" if choice == "auto" else "asked for the base's"
        return None, "neither the adapter nor the base folder has tokenizer files"
    return choice, "a tokenizer folder was given"


# LoRA initialisations that rewrite the base weights when training starts (PEFT's init_lora_weights):
# an adapter saved without PEFT's conversion fits only that rewritten "residual" base
BASE_MUTATING_INITS = {"pissa": "PiSSA", "olora": "OLoRA", "corda": "CorDA", "loftq": "LoftQ", "lora_ga": "LoRA-GA"}


def base_mutating_init_problem(adapter: AdapterInfo) -> str | None:
    init = adapter.config.get("init_lora_weights")
    if not isinstance(init, str):
        return None
    family = next((name for prefix, name in BASE_MUTATING_INITS.items() if init.lower().startswith(prefix)), None)
    if family is None:
        return None
    return (f"{adapter.folder / 'adapter_config.json'}: init_lora_weights={init!r}: {family} rewrites the base weights when "
            "training starts and this adapter was saved without PEFT's conversion, so it fits only that rewritten base; "
            "merged into the original it would be silently wrong. Save it converted (PEFT: save_pretrained(DIR, "
            "path_initial_model_for_weight_conversion=INITIAL_ADAPTER_DIR); LLaMA-Factory: pissa_convert: true) and merge that")


def declared_but_missing(adapter: AdapterInfo, layout: ModelLayout, module_of) -> list[str]:
    """Trained modules the adapter config declares (modules_to_save, trainable_token_indices) that
    exist in the model but have no tensors in the adapter file: merging would silently keep the
    base's values where training changed them (PEFT's PiSSA/OLoRA conversion drops them, so do
    partial saves). ``module_of(key)`` resolves an adapter key's module in the model."""
    def matches(module: str | None, name: str) -> bool:
        return module is not None and (module == name or module.endswith("." + name))

    def model_has(name: str) -> bool:
        return any(matches(m, name) for m in layout.modules)

    saved = {role: [module_of(k) for k in adapter.keys if k.role in roles] for role, roles in
             (("full", ("full_weight", "full_bias")), ("tokens", ("trainable_tokens",)))}
    problems = []
    declared = [n for n in adapter.modules_to_save if model_has(n)]
    heads = [n for n in declared if n in ("score", "classifier")]  # PEFT declares both for a task head; one exists
    for name in declared:
        if name in heads and any(any(matches(m, h) for m in saved["full"]) for h in heads):
            continue
        if not any(matches(m, name) for m in saved["full"]):
            problems.append(name)
    spec = adapter.config.get("trainable_token_indices")
    token_modules = list(spec) if isinstance(spec, dict) else (["embed_tokens"] if spec else [])
    for name in token_modules:
        if model_has(name) and not any(matches(m, name) for m in saved["tokens"] + saved["full"]):
            problems.append(f"{name} (trainable_token_indices)")
    return problems


def serving_config_edits(base: CheckpointInfo, tie: bool, base_tied: bool, dtype: str) -> dict:
    """config.json keys every reader must find right: the tie flag at every level (vLLM and SGLang
    read text_config's, transformers the top level's; a flag at one level only has made served
    models drop their head), and a concrete dtype wherever a dtype key is (a null one makes vLLM
    load float32)."""
    edits: dict = {}
    key = base.text_config_key
    levels = [("", base.config)] + ([(f"{key}.", base.config[key])] if key else [])
    if tie != base.declared_tie() or (base_tied and not tie) or any(
            level.get("tie_word_embeddings") != tie for _, level in levels):
        for prefix, _ in levels:
            edits[f"{prefix}tie_word_embeddings"] = tie
    edits["dtype"] = dtype
    for prefix, level in levels:
        for name in ("dtype", "torch_dtype"):
            if name in level:
                edits[f"{prefix}{name}"] = dtype
    return edits


# architectures whose served forms always compute logits with the embedding matrix: vLLM and
# SGLang build them tied whatever the config says, and llama.cpp's converter drops lm_head.weight
HARD_TIED_MODEL_TYPES = ("gemma", "gemma2", "gemma3", "gemma3_text", "cohere", "cohere2", "mpt")


def hard_tied_head_note(base: CheckpointInfo, tie: bool) -> str | None:
    model_type = base.text_config.get("model_type") or base.config.get("model_type")
    if tie or model_type not in HARD_TIED_MODEL_TYPES:
        return None
    return (f"{model_type}: the trained lm_head differs from the embedding, but vLLM and SGLang always serve {model_type} "
            "with the head tied to the embedding and llama.cpp's converter drops lm_head.weight: there the trained head is "
            "ignored (transformers uses it)")


def qlora_evidence(adapter: AdapterInfo) -> str | None:
    """What in the adapter says it was trained on a 4-bit bitsandbytes base (QLoRA), or None:
    its recorded base (unsloth/...-bnb-4bit) or a training config saved beside it."""
    recorded = str(adapter.config.get("base_model_name_or_path") or "")
    if re.search(r"bnb[-_]4bit|[-_]4bit$", recorded, re.IGNORECASE):
        return f"the adapter records its base as {recorded}, a 4-bit bitsandbytes model"
    for name, pattern in (("training_args.yaml", r"^\s*quantization_bit:\s*4\b"), ("config.yaml", r"^\s*load_in_4bit:\s*true\b"),
                          ("axolotl_config.yaml", r"^\s*load_in_4bit:\s*true\b")):
        path = adapter.folder / name
        try:
            if path.is_file() and not path.is_symlink() and path.stat().st_size < 1 << 20 and \
                    re.search(pattern, path.read_text(encoding="utf-8", errors="replace"), re.IGNORECASE | re.MULTILINE):
                return f"{name} beside the adapter trained on a 4-bit base"
        except OSError:
            continue
    return None
