"""Tiny bases and adapters, built on disk the way users build them.

The user's flow, reproduced step by step: the base is saved with ``save_pretrained`` (with its
tokenizer), then loaded back from that folder, tokens are added to the tokenizer, the model is
resized with ``resize_token_embeddings(len(tok), pad_to_multiple_of=..., mean_resizing=False)``,
wrapped with ``get_peft_model``, "trained" (every trainable tensor perturbed, so LoRA B is non-zero
and the saved embedding copies differ from the base), and saved with ``PeftModel.save_pretrained``
next to the tokenizer. Loading the base from its folder matters: PEFT's
``save_embedding_layers="auto"`` compares against ``base_model_name_or_path`` and only then saves
the resized embedding layers, which changes the adapter's key names.

Everything is random and built in code; nothing is downloaded.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# The auto check in PEFT's save falls back to the Hub when the base folder has no config.json.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 32, 64, 2, 4, 2
ALL_LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EMBED_AND_HEAD = ["embed_tokens", "lm_head"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


@dataclass
class Scenario:
    base_dir: Path
    adapter_dir: Path
    new_token_ids: list[int]
    expect_embed_rows: int
    expect_head_rows: int
    expect_tied: bool
    tokenizer_len: int | None  # the adapter tokenizer's length; None when the adapter folder has none
    multimodal: bool
    description: str
    name: str = ""
    base_rows: int = 0  # embedding rows in the base checkpoint
    base_tokenizer_len: int = 0
    dtype: torch.dtype = torch.float32
    pad_to_multiple_of: int | None = None
    chat_template: str | None = None
    adapter_keys: dict[str, tuple[int, ...]] = field(default_factory=dict)  # as saved, for the report


# ---------------------------------------------------------------------------------------- tokenizers


def make_tokenizer(n_tokens: int, kind: str = "wordlevel"):
    """A fast tokenizer with exactly ``n_tokens`` ids: WordLevel <unk>, <s>, </s>, w3, w4, ...;
    or ``kind="qwen2"``: a byte-level BPE Qwen2Tokenizer whose last id is <|endoftext|>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if kind == "qwen2":
        # transformers 5's AutoTokenizer rebuilds a qwen2 folder with Qwen2Tokenizer whatever
        # tokenizer_class says, which mangles a WordLevel vocabulary: give it a real one.
        from transformers import Qwen2Tokenizer

        letters = [chr(ord("a") + i) for i in range(26)]
        vocab = {t: i for i, t in enumerate(letters + [f"q{i}" for i in range(26, n_tokens - 1)])}
        tok = Qwen2Tokenizer(vocab=vocab, merges=[])
        assert len(tok) == n_tokens and tok.convert_tokens_to_ids("<|endoftext|>") == n_tokens - 1
        return tok

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, n_tokens)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    assert len(tok) == n_tokens
    return tok


def _add_tokens(tok, specials: list[str], words: list[str], pad: str | None) -> list[int]:
    before = len(tok)
    if specials:
        tok.add_tokens(specials, special_tokens=True)
    if words:
        tok.add_tokens(words)
    if pad:
        tok.add_special_tokens({"pad_token": pad})
    new_ids = list(range(before, len(tok)))
    assert tok.convert_tokens_to_ids(specials + words + ([pad] if pad else [])) == new_ids
    return new_ids


# -------------------------------------------------------------------------------------------- models


def llama_config(vocab: int, tied: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                       num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                       tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, max_position_embeddings=64)


def qwen2_config(vocab: int, endoftext: int):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                       num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                       tie_word_embeddings=True, bos_token_id=endoftext, eos_token_id=endoftext,
                       max_position_embeddings=64)


def gpt2_config(vocab: int):
    from transformers import GPT2Config

    # GPT-2 defaults bos/eos to 50256, outside a 64-row vocabulary
    return GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=2, vocab_size=vocab, n_positions=64,
                      bos_token_id=1, eos_token_id=2)


def llava_config(vocab: int, image_token_id: int):
    from transformers import CLIPVisionConfig, LlavaConfig

    text = llama_config(vocab)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=8, patch_size=4)
    return LlavaConfig(text_config=text, vision_config=vision, image_token_id=image_token_id, image_seq_length=4)


def perturb_trainable(peft_model, seed: int, scale: float = 0.05) -> None:
    """Stands in for training: every trainable tensor moves, each independently."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(peft_model.named_parameters()):
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=gen, dtype=torch.float32) * scale
                param.add_(noise.to(param.dtype))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name or "lora_embedding_B" in name:
            assert param.abs().sum() > 0, f"{name} is still zero"


def _adapter_keys(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _build(
    root: Path,
    *,
    name: str,
    description: str,
    make_model: Callable[[], torch.nn.Module],
    base_tokens: int,
    tokenizer_kind: str = "wordlevel",
    lora: dict,
    specials: tuple[str, ...] = (),
    words: tuple[str, ...] = (),
    pad_token: str | None = None,
    pad_to_multiple_of: int | None = None,
    resize: bool = True,
    expect_rows: int | None = None,
    expect_tied: bool,
    dtype: torch.dtype = torch.float32,
    base_save: dict | None = None,
    adapter_save: dict | None = None,
    chat_template: str | None = None,
    multimodal: bool = False,
    seed: int = 0,
) -> Scenario:
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    root = Path(root)
    base_dir, adapter_dir = root / "base", root / "adapter"
    torch.manual_seed(seed)

    # ---- the base, as published: model + its own tokenizer, no added tokens
    model = make_model().to(dtype)
    base_rows = model.get_input_embeddings().weight.shape[0]
    model.save_pretrained(base_dir, **(base_save or {}))
    make_tokenizer(base_tokens, tokenizer_kind).save_pretrained(base_dir)
    cls = type(model)
    del model

    # ---- the user's fine-tuning script
    tok = AutoTokenizer.from_pretrained(base_dir)
    assert len(tok) == base_tokens
    model = getattr(transformers, cls.__name__).from_pretrained(base_dir, dtype=dtype)
    new_ids = _add_tokens(tok, list(specials), list(words), pad_token)
    if chat_template:
        tok.chat_template = chat_template
    if new_ids and resize:
        model.resize_token_embeddings(len(tok), pad_to_multiple_of=pad_to_multiple_of, mean_resizing=False)
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows == (expect_rows or rows), (name, rows, expect_rows)
    assert model.get_output_embeddings().weight.shape[0] == rows
    lora = dict(lora)
    if lora.get("trainable_token_indices") == "new":
        lora["trainable_token_indices"] = new_ids
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's tied-weights and auto-save notices, expected here
        peft_model = get_peft_model(model, LoraConfig(**{"r": 8, "lora_alpha": 16, **lora}))
        perturb_trainable(peft_model, seed=seed + 1)
        peft_model.save_pretrained(adapter_dir, **(adapter_save or {}))
    if new_ids:
        tok.save_pretrained(adapter_dir)

    return Scenario(
        base_dir=base_dir, adapter_dir=adapter_dir, new_token_ids=new_ids,
        expect_embed_rows=rows, expect_head_rows=rows, expect_tied=expect_tied,
        tokenizer_len=len(tok) if new_ids else None, multimodal=multimodal, description=description,
        name=name, base_rows=base_rows, base_tokenizer_len=base_tokens, dtype=dtype,
        pad_to_multiple_of=pad_to_multiple_of, chat_template=chat_template,
        adapter_keys=_adapter_keys(adapter_dir),
    )


def _llama(vocab: int, tied: bool = False):
    from transformers import LlamaForCausalLM

    return lambda: LlamaForCausalLM(llama_config(vocab, tied))


# ------------------------------------------------------------------------------------------ scenarios


def llama_untied_plus3(root: Path) -> Scenario:
    return _build(root, name="llama_untied_plus3",
                  description="untied Llama, +3 tokens, embed+head in modules_to_save, LoRA on every linear",
                  make_model=_llama(64), base_tokens=64, specials=("<|im_start|>", "<|im_end|>"), words=("tool",),
                  lora=dict(target_modules=ALL_LLAMA_LINEAR, modules_to_save=EMBED_AND_HEAD),
                  expect_rows=67, expect_tied=False, chat_template=CHAT_TEMPLATE)


def autotrain_pad16(root: Path) -> Scenario:
    return _build(root, name="autotrain_pad16",
                  description="AutoTrain: a pad token added, resized with pad_to_multiple_of=16 (65 -> 80)",
                  make_model=_llama(64), base_tokens=64, pad_token="<pad>", pad_to_multiple_of=16,
                  lora=dict(target_modules="all-linear", modules_to_save=EMBED_AND_HEAD),
                  expect_rows=80, expect_tied=False)


def llamafactory_pad64(root: Path) -> Scenario:
    return _build(root, name="llamafactory_pad64",
                  description="LLaMA-Factory resize_vocab: base 100, +2 tokens padded to 64 (102 -> 128)",
                  make_model=_llama(100), base_tokens=100, specials=("<|tool_call|>", "<|observation|>"),
                  pad_to_multiple_of=64,
                  lora=dict(target_modules=["q_proj", "v_proj"], modules_to_save=EMBED_AND_HEAD),
                  expect_rows=128, expect_tied=False)


def medicalgpt_extended(root: Path) -> Scenario:
    return _build(root, name="medicalgpt_extended",
                  description="MedicalGPT-style extended vocabulary (32000 -> 33296 scaled down: 250 -> 260)",
                  make_model=_llama(250), base_tokens=250, words=tuple(f"med{i}" for i in range(10)),
                  lora=dict(target_modules=ALL_LLAMA_LINEAR, modules_to_save=EMBED_AND_HEAD),
                  expect_rows=260, expect_tied=False)


def qwen_padded_base(root: Path) -> Scenario:
    from transformers import Qwen2ForCausalLM

    # Qwen2-0.5B: 151936 rows for 151646 tokens, tied. The new tokens fit in the spare rows, so the
    # adapter was trained without any resize (resize_token_embeddings(len(tok)) would shrink it).
    return _build(root, name="qwen_padded_base",
                  description="tied Qwen2 base with 96 rows for 80 tokens, +2 tokens that fit, LoRA on attention",
                  make_model=lambda: Qwen2ForCausalLM(qwen2_config(96, endoftext=79)), base_tokens=80,
                  tokenizer_kind="qwen2",
                  specials=("<|im_start|>", "<|im_end|>"), resize=False,
                  lora=dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
                  expect_rows=96, expect_tied=True, chat_template=CHAT_TEMPLATE)


def tied_diverged(root: Path) -> Scenario:
    return _build(root, name="tied_diverged",
                  description="tied base, +3 tokens, embed and head saved as two separately trained copies",
                  make_model=_llama(64, tied=True), base_tokens=64, specials=("<a>", "<b>", "<c>"),
                  lora=dict(target_modules=["q_proj", "v_proj"], modules_to_save=EMBED_AND_HEAD),
                  expect_rows=67, expect_tied=False)


def tied_still_tied(root: Path) -> Scenario:
    return _build(root, name="tied_still_tied",
                  description="tied base, +2 tokens, LoRA on q/v, resized embedding saved with save_embedding_layers",
                  make_model=_llama(64, tied=True), base_tokens=64, specials=("<a>", "<b>"),
                  lora=dict(target_modules=["q_proj", "v_proj"]), adapter_save=dict(save_embedding_layers=True),
                  expect_rows=66, expect_tied=True)


def tied_embed_only_trained(root: Path) -> Scenario:
    # only the embedding is a trained copy (modules_to_save); PEFT's head keeps using the original
    # shared matrix, so the merge must untie and give the head the original (resized) rows
    return _build(root, name="tied_embed_only_trained",
                  description="tied base, +2 tokens, only embed_tokens in modules_to_save: the head stays the original",
                  make_model=_llama(64, tied=True), base_tokens=64, specials=("<a>", "<b>"),
                  lora=dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
                  expect_rows=66, expect_tied=False)


def lora_on_embed_and_head(root: Path) -> Scenario:
    return _build(root, name="lora_on_embed_and_head",
                  description="untied, +3 tokens, LoRA on embed_tokens and lm_head themselves",
                  make_model=_llama(64), base_tokens=64, specials=("<a>", "<b>", "<c>"),
                  lora=dict(target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"]),
                  expect_rows=67, expect_tied=False)


def trainable_tokens_untied(root: Path) -> Scenario:
    return _build(root, name="trainable_tokens_untied",
                  description="untied, +3 tokens trained with LoraConfig(trainable_token_indices=new ids)",
                  make_model=_llama(64), base_tokens=64, specials=("<a>", "<b>", "<c>"),
                  lora=dict(target_modules=["q_proj"], trainable_token_indices="new"),
                  expect_rows=67, expect_tied=False)


def trainable_tokens_tied(root: Path) -> Scenario:
    return _build(root, name="trainable_tokens_tied",
                  description="tied, +3 tokens trained with LoraConfig(trainable_token_indices=new ids)",
                  make_model=_llama(64, tied=True), base_tokens=64, specials=("<a>", "<b>", "<c>"),
                  lora=dict(target_modules=["q_proj"], trainable_token_indices="new"),
                  expect_rows=67, expect_tied=True)


def llava_text_config(root: Path) -> Scenario:
    from transformers import LlavaForConditionalGeneration

    # llava-1.5 style: <image> and <pad> appended to the text vocabulary; the vocabulary size
    # lives in text_config only. LoRA on q/v also reaches the CLIP tower, as a plain list does.
    return _build(root, name="llava_text_config",
                  description="tiny LLaVA (Llama text + CLIP vision), +2 tokens, embed+head in modules_to_save",
                  make_model=lambda: LlavaForConditionalGeneration(llava_config(64, image_token_id=64)),
                  base_tokens=64, specials=("<image>",), pad_token="<pad>",
                  lora=dict(target_modules=["q_proj", "v_proj"], modules_to_save=EMBED_AND_HEAD),
                  expect_rows=66, expect_tied=False, multimodal=True)


def dora_rslora(root: Path) -> Scenario:
    return _build(root, name="dora_rslora",
                  description="DoRA + rsLoRA with rank_pattern/alpha_pattern, no vocabulary change",
                  make_model=_llama(64), base_tokens=64,
                  lora=dict(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True, use_rslora=True,
                            rank_pattern={"down_proj": 4}, alpha_pattern={"layers.1.self_attn.q_proj": 32}),
                  expect_rows=64, expect_tied=False)


def gpt2_conv1d(root: Path) -> Scenario:
    from transformers import GPT2LMHeadModel

    # GPT-2 is tied; modules_to_save gives wte and lm_head separate trainable copies that drift
    # apart during training, and PEFT saves both: the merge must untie.
    return _build(root, name="gpt2_conv1d",
                  description="tied GPT-2 (Conv1D), LoRA fan_in_fan_out on c_attn/c_proj, +2 tokens, wte+lm_head saved",
                  make_model=lambda: GPT2LMHeadModel(gpt2_config(64)), base_tokens=64, specials=("<a>", "<b>"),
                  lora=dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                            modules_to_save=["wte", "lm_head"]),
                  expect_rows=66, expect_tied=False)


def bf16_sharded(root: Path) -> Scenario:
    return _build(root, name="bf16_sharded",
                  description="bf16 base in >= 3 safetensors shards, +1 token padded to 8 (65 -> 72)",
                  make_model=_llama(64), base_tokens=64, specials=("<a>",), pad_to_multiple_of=8,
                  lora=dict(target_modules=["q_proj", "v_proj"], modules_to_save=EMBED_AND_HEAD),
                  dtype=torch.bfloat16, base_save=dict(max_shard_size="12KB"),
                  expect_rows=72, expect_tied=False)


def phi_head_bias(root: Path) -> Scenario:
    from transformers import PhiConfig, PhiForCausalLM

    # Phi's lm_head has a bias, one logit offset per vocabulary row: it grows with the head
    config = PhiConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                       num_attention_heads=HEADS, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    return _build(root, name="phi_head_bias",
                  description="Phi (lm_head with a bias), +3 tokens padded to 8, embed+head in modules_to_save",
                  make_model=lambda: PhiForCausalLM(config), base_tokens=64, specials=("<|user|>", "<|end|>"),
                  words=("tool",), pad_to_multiple_of=8,
                  lora=dict(target_modules=["q_proj", "v_proj", "dense", "fc1", "fc2"], modules_to_save=EMBED_AND_HEAD),
                  expect_rows=72, expect_tied=False)


def dora_on_embedding(root: Path) -> Scenario:
    # PEFT normalises an embedding's DoRA update per embedding dimension, over every row
    return _build(root, name="dora_on_embedding",
                  description="DoRA on embed_tokens and q/v (LoRA on the embedding itself), lm_head trained whole, +2 tokens",
                  make_model=_llama(64), base_tokens=64, specials=("<a>", "<b>"),
                  lora=dict(target_modules=["embed_tokens", "q_proj", "v_proj"], use_dora=True, modules_to_save=["lm_head"]),
                  expect_rows=66, expect_tied=False)


def no_vocab_change(root: Path) -> Scenario:
    return _build(root, name="no_vocab_change",
                  description="tied base, plain LoRA on q/v, no tokens added",
                  make_model=_llama(64, tied=True), base_tokens=64,
                  lora=dict(target_modules=["q_proj", "v_proj"]), expect_rows=64, expect_tied=True)


SCENARIOS: dict[str, Callable[[Path], Scenario]] = {f.__name__: f for f in (
    llama_untied_plus3, autotrain_pad16, llamafactory_pad64, medicalgpt_extended, qwen_padded_base,
    tied_diverged, tied_still_tied, tied_embed_only_trained, lora_on_embed_and_head, trainable_tokens_untied, trainable_tokens_tied,
    llava_text_config, dora_rslora, gpt2_conv1d, bf16_sharded, no_vocab_change, phi_head_bias, dora_on_embedding,
)}


def build_scenario(name: str, root: Path) -> Scenario:
    return SCENARIOS[name](Path(root))


# ------------------------------------------------------------------------------------------ reference


def model_class(folder: Path):
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    return getattr(transformers, config.architectures[0])


def reference_logits(scenario: Scenario, input_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """PEFT's own answer, unmerged: the base resized to the expected rows, the adapter on top."""
    from peft import PeftModel

    # resize_token_embeddings(mean_resizing=False) draws the grown rows from the global RNG
    with torch.random.fork_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1234)
        model = model_class(scenario.base_dir).from_pretrained(scenario.base_dir, dtype=dtype)
        if model.get_input_embeddings().weight.shape[0] != scenario.expect_embed_rows:
            model.resize_token_embeddings(scenario.expect_embed_rows, mean_resizing=False)
        peft_model = PeftModel.from_pretrained(model, scenario.adapter_dir).eval()
        with torch.no_grad():
            return peft_model(input_ids=input_ids).logits


def trained_vocab_columns(scenario: Scenario) -> list[int]:
    """Logit columns whose head rows are determined: the base's rows and the added tokens.
    Padding rows of a resized head are never trained and each tool fills them its own way."""
    return sorted(set(range(scenario.base_rows)) | set(scenario.new_token_ids))


def sample_input_ids(scenario: Scenario) -> torch.Tensor:
    """[2, 12]: ordinary base tokens with every added token id placed among them."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(3, scenario.base_tokenizer_len, (2, 12), generator=gen)
    ids[:, 0] = 1  # <s>
    slots = [(row, col) for col in range(2, 12) for row in (0, 1)]
    assert len(scenario.new_token_ids) <= len(slots)
    for (row, col), token in zip(slots, scenario.new_token_ids, strict=False):  # fewer tokens than slots
        ids[row, col] = token
    return ids


# -------------------------------------------------------------------------------- stacked pipelines


@dataclass
class StageSpec:
    """One stage of a pipeline, trained on the merge of the stages before it."""

    name: str
    lora: dict
    words: tuple[str, ...] = ()
    specials: tuple[str, ...] = ()
    pad_to_multiple_of: int | None = None
    save_tokenizer: bool = True


@dataclass
class Stack:
    base_dir: Path
    adapter_dirs: list[Path]
    merged_dirs: list[Path]  # each stage merged by the user with PEFT, as the pipeline did between stages
    new_token_ids: list[int]  # every stage's, in order
    rows: list[int]  # embedding rows each stage trained with
    tokenizer_len: int


def grow_like_merger(model, old_rows: int) -> None:
    """Rows that resize_token_embeddings added, set to the mean of the rows before them: what a
    mean-resizing pipeline gives on average and what merger's default --new-rows rule writes, so an
    untrained grown row has one well-defined value for the reference to compare against."""
    with torch.no_grad():
        for module in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
            if module is not None and module.weight.shape[0] > old_rows:
                module.weight[old_rows:] = module.weight[:old_rows].float().mean(dim=0).to(module.weight.dtype)


def build_stack(root: Path, stages: list[StageSpec], *, tied: bool = False, base_tokens: int = 64,
                dtype: torch.dtype = torch.float32, seed: int = 0) -> Stack:
    """A base, then each stage as the user runs it: load the previous merge, add tokens, resize
    (padded), train LoRA, save the adapter (and tokenizer), merge with PEFT and save that for the next."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaForCausalLM

    root = Path(root)
    torch.manual_seed(seed)
    base_dir = root / "base"
    LlamaForCausalLM(llama_config(base_tokens, tied)).to(dtype).save_pretrained(base_dir)
    make_tokenizer(base_tokens).save_pretrained(base_dir)
    previous, adapters, merged_dirs, new_ids, rows = base_dir, [], [], [], []
    for number, spec in enumerate(stages, 1):
        tok = AutoTokenizer.from_pretrained(previous)
        model = LlamaForCausalLM.from_pretrained(previous, dtype=dtype)
        ids = _add_tokens(tok, list(spec.specials), list(spec.words), None)
        old_rows = model.get_input_embeddings().weight.shape[0]
        if ids and len(tok) > old_rows or spec.pad_to_multiple_of and ids:
            model.resize_token_embeddings(len(tok), pad_to_multiple_of=spec.pad_to_multiple_of, mean_resizing=False)
            grow_like_merger(model, old_rows)
        lora = dict(spec.lora)
        if lora.get("trainable_token_indices") == "new":
            lora["trainable_token_indices"] = ids
        adapter_dir = root / spec.name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(model, LoraConfig(**{"r": 4, "lora_alpha": 8, **lora}))
            perturb_trainable(peft_model, seed=seed + number)
            peft_model.save_pretrained(adapter_dir)
            if spec.save_tokenizer:
                tok.save_pretrained(adapter_dir)
            merged = peft_model.merge_and_unload()
        merged_dir = root / f"merged-{number}"
        merged.save_pretrained(merged_dir)
        tok.save_pretrained(merged_dir)
        adapters.append(adapter_dir)
        merged_dirs.append(merged_dir)
        new_ids += ids
        rows.append(merged.get_input_embeddings().weight.shape[0])
        previous = merged_dir
    return Stack(base_dir, adapters, merged_dirs, new_ids, rows, len(tok))


def medical_pipeline(root: Path, tied: bool = False) -> Stack:
    """MedicalGPT / Chinese-LLaMA: PT adds domain tokens (embed+head saved whole), SFT adds chat tokens
    (trainable tokens), both padded to 8; DPO trains LoRA only and saves no tokenizer."""
    return build_stack(root, [
        StageSpec("pt", dict(target_modules=ALL_LLAMA_LINEAR, modules_to_save=EMBED_AND_HEAD),
                  words=("gene", "protein", "dose"), pad_to_multiple_of=8),  # 64 + 3 -> 72 rows
        StageSpec("sft", dict(target_modules=["q_proj", "v_proj", "o_proj"], trainable_token_indices="new"),
                  specials=("<|im_start|>", "<|im_end|>", "<|tool|>"), words=("dosage", "symptom", "patient", "trial"),
                  pad_to_multiple_of=8),  # 67 + 7 -> 80 rows
        StageSpec("dpo", dict(target_modules=["q_proj", "k_proj", "v_proj", "down_proj"]), save_tokenizer=False),
    ], tied=tied)


def mxfp4_checkpoint(model, scales: tuple[int, int], seed: int = 1) -> dict[str, torch.Tensor]:
    """``model``'s state as gpt-oss ships it: stacked experts only as MXFP4 ``*_blocks`` (random codes)
    and ``*_scales`` (E8M0 exponents drawn from ``scales``), everything else bf16."""
    generator = torch.Generator().manual_seed(seed)
    stored = {}
    for key, value in model.state_dict().items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            experts, columns, rows = value.shape  # the parameter is (experts, in, out); stored (experts, out, groups, 16)
            stored[key + "_blocks"] = torch.randint(0, 256, (experts, rows, columns // 32, 16), generator=generator,
                                                    dtype=torch.uint8)
            stored[key + "_scales"] = torch.randint(*scales, (experts, rows, columns // 32), generator=generator,
                                                    dtype=torch.uint8)
        else:
            stored[key] = value.to(torch.bfloat16).contiguous()
    return stored
