"""merge-adapter demo: a tiny base and a resized-vocabulary adapter built in memory, then merged.

No downloads: the tokenizer, the model and the LoRA training are all made here, the way a user's
fine-tune makes them (add tokens, resize with pad_to_multiple_of, train LoRA + embed/head).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(61)]  # a 64-token base vocabulary
NEW_TOKENS = ["<|im_start|>", "<|im_end|>", "<tool>"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def build_demo_pair(folder: Path, pad_to_multiple_of: int = 16, seed: int = 0, tied: bool = False) -> tuple[Path, Path]:
    """Write base/ and adapter/ into ``folder`` and return their paths.

    With ``tied``, the base ties lm_head to embed_tokens and training moves the two saved copies
    apart, as modules_to_save does on a tied model: the merge must untie them.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    base_dir, adapter_dir = folder / "base", folder / "adapter"
    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                         bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config)
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)

    tokenizer.add_special_tokens({"additional_special_tokens": NEW_TOKENS})
    tokenizer.chat_template = CHAT_TEMPLATE
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=pad_to_multiple_of, mean_resizing=False)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      modules_to_save=["embed_tokens", "lm_head"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():  # stands in for training: every trainable tensor moves
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    peft_model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    return base_dir, adapter_dir


def plain_peft_error(base_dir: Path, adapter_dir: Path) -> str:
    """What users see when they load the adapter onto the un-resized base (shown, not claimed)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    try:
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, trust_remote_code=False), adapter_dir)
    except Exception as exc:  # the point is to show whatever PEFT raises
        lines = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        return lines[0] if lines else f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    return "loads without error"


def run_demo(out: str | None, options, quiet: bool = False, as_json: bool = False) -> int:
    from .api import merge_adapter
    from .render import plan_text, result_dict

    with tempfile.TemporaryDirectory(prefix="merger-demo-") as scratch:
        base_dir, adapter_dir = build_demo_pair(Path(scratch))
        out_dir = Path(out) if out else Path(scratch) / "merged"
        if options.validate == "fast":
            options = options.replace(validate="full")  # the demo shows the strongest proof
        if not as_json:
            print(f"demo: a 64-token Llama base, an adapter trained after adding {len(NEW_TOKENS)} tokens "
                  f"and resizing with pad_to_multiple_of=16")
            print(f"plain PEFT on this pair: {plain_peft_error(base_dir, adapter_dir)}\n")
            from .api import inspect_adapter

            print(plan_text(inspect_adapter(base_dir, adapter_dir, options)) + "\n")
        result = merge_adapter(base_dir, adapter_dir, out_dir, options, quiet=quiet)
        if as_json:
            print(json.dumps(result_dict(result), indent=2, default=str))
        else:
            from .render import serving_text

            print("\n".join([result.summary()] + serving_text(result.validation.serving)))
    return 0
