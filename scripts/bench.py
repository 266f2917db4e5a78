#!/usr/bin/env python
"""Benchmark: stream engine (without and with validation) vs PEFT engine vs `cp -r`, side by side.

Builds a synthetic Llama in bf16 with 1 GB shards (TinyLlama shape by default, ~1.1B parameters)
and a MedicalGPT-style adapter (vocabulary 32000 -> 33296, r=64 on every linear layer,
modules_to_save embed_tokens + lm_head), then runs each contender in a fresh process,
alternating, several repetitions, and reports median wall time and peak RSS (from wait4, per
process) with ratios. A benchmark, not a test: the numbers go in the README.

Contenders: `cp -r` + `sync` (the disk floor), the stream engine with `--validate off` (the merge
alone) and with `--validate fast` (what a plain `merge-adapter` run does: the merge, then the
output read back and checked), and the PEFT engine with `--validate` (default off).

    python scripts/bench.py                      # 1.1B, 3 repetitions
    python scripts/bench.py --shape 3b --reps 2  # ~3B: the stream engine's memory must not grow
    python scripts/bench.py --shape moe --reps 1 # ~3.3B Qwen3-MoE, 64 experts, expert LoRA

The MoE shape is a Qwen3-MoE (Qwen3-30B-A3B's hidden size, head_dim, kv heads and vocabulary, 16 query heads; 24 layers of
64 experts with moe_intermediate_size 256, 8 active; ~3.3B parameters, 6.6 GB bf16 in ~1 GB shards)
in the layout transformers 5 saves it (one tensor per expert and projection,
``model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight``), with the adapter PEFT 0.21 saves for
transformers 5's fused experts: r=16 on q/k/v/o_proj plus ``target_parameters`` mlp.experts.gate_up_proj
and mlp.experts.down_proj (the nested ParamWrapper keys ``mlp.experts.base_layer.lora_A`` for
gate_up_proj, ``mlp.experts.lora_A`` for down_proj, A of (E*r, in), B of (out, E*r)).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads
    "1b": (2048, 5632, 22, 32, 4),  # TinyLlama-1.1B
    "3b": (3200, 8640, 26, 32, 32),  # OpenLLaMA-3B
    "tiny": (256, 688, 4, 8, 2),  # for a quick check of the script itself
}
MOE_SHAPES = {
    # hidden, moe_intermediate, layers, heads, kv heads, head_dim, experts, active, vocab
    "moe": (2048, 256, 24, 16, 4, 128, 64, 8, 151936),
    "moe-tiny": (128, 64, 3, 4, 2, 32, 8, 2, 1000),  # for a quick check of the script itself
}
MOE_RANK = 16
BASE_VOCAB, NEW_VOCAB, RANK = 32000, 33296, 64


class Shards:
    """Base shards of about 1 GB, written as they fill, renamed to -of-N with an index at the end."""

    def __init__(self, folder: Path):
        self.folder, self.shard, self.size, self.names, self.weight_map = folder, {}, 0, [], {}

    def flush(self):
        from safetensors.torch import save_file

        if self.shard:
            name = f"model-{len(self.names) + 1:05d}.safetensors"
            save_file(self.shard, self.folder / name, metadata={"format": "pt"})
            self.names.append(name)
            self.weight_map.update({k: name for k in self.shard})
            self.shard, self.size = {}, 0

    def add(self, name, tensor):
        nbytes = tensor.numel() * tensor.element_size()
        if self.size + nbytes > 1_000_000_000:
            self.flush()
        self.shard[name] = tensor
        self.size += nbytes

    def finish(self):
        self.flush()
        total, renamed = len(self.names), {}
        for index, name in enumerate(self.names, 1):
            renamed[name] = f"model-{index:05d}-of-{total:05d}.safetensors"
            (self.folder / name).rename(self.folder / renamed[name])
        weight_map = {k: renamed[v] for k, v in self.weight_map.items()}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))


def start_pair(folder: Path):
    """The base and adapter folders, created, and a seeded generator of small bf16 weights."""
    import torch

    base, adapter = folder / "base", folder / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir()
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.bfloat16, std=0.02):
        return (torch.randn(*shape, generator=gen) * std).to(dtype)

    return base, adapter, rand


def build_moe(folder: Path, shape: str) -> tuple[Path, Path]:
    """A Qwen3-MoE base as transformers 5 saves it and an expert-LoRA adapter as PEFT 0.21 saves it."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen3MoeConfig

    hidden, inter, layers, heads, kv, head_dim, experts, active, vocab = MOE_SHAPES[shape]
    r = MOE_RANK
    base, adapter, rand = start_pair(folder)

    config = Qwen3MoeConfig(
        hidden_size=hidden, intermediate_size=3 * hidden, moe_intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, num_experts=experts,
        num_experts_per_tok=active, vocab_size=vocab, decoder_sparse_step=1, mlp_only_layers=[],
        norm_topk_prob=True, tie_word_embeddings=False, max_position_embeddings=4096,
        bos_token_id=min(151643, vocab - 2), eos_token_id=min(151645, vocab - 1), torch_dtype="bfloat16", architectures=["Qwen3MoeForCausalLM"])
    config.save_pretrained(base)
    attention = {
        "q_proj": (heads * head_dim, hidden), "k_proj": (kv * head_dim, hidden),
        "v_proj": (kv * head_dim, hidden), "o_proj": (hidden, heads * head_dim),
    }
    shards, lora = Shards(base), {}
    shards.add("model.embed_tokens.weight", rand(vocab, hidden))
    for i in range(layers):
        layer = f"model.layers.{i}"
        for name, (out_f, in_f) in attention.items():
            shards.add(f"{layer}.self_attn.{name}.weight", rand(out_f, in_f))
            prefix = f"base_model.model.{layer}.self_attn.{name}"
            lora[f"{prefix}.lora_A.weight"] = rand(r, in_f, dtype=torch.float32)
            lora[f"{prefix}.lora_B.weight"] = rand(out_f, r, dtype=torch.float32, std=0.002)
        shards.add(f"{layer}.self_attn.q_norm.weight", torch.ones(head_dim, dtype=torch.bfloat16))
        shards.add(f"{layer}.self_attn.k_norm.weight", torch.ones(head_dim, dtype=torch.bfloat16))
        shards.add(f"{layer}.mlp.gate.weight", rand(experts, hidden))
        for e in range(experts):
            shards.add(f"{layer}.mlp.experts.{e}.gate_proj.weight", rand(inter, hidden))
            shards.add(f"{layer}.mlp.experts.{e}.up_proj.weight", rand(inter, hidden))
            shards.add(f"{layer}.mlp.experts.{e}.down_proj.weight", rand(hidden, inter))
        shards.add(f"{layer}.input_layernorm.weight", torch.ones(hidden, dtype=torch.bfloat16))
        shards.add(f"{layer}.post_attention_layernorm.weight", torch.ones(hidden, dtype=torch.bfloat16))
        # PEFT nests one ParamWrapper per target parameter: the first (gate_up_proj, fused (E, 2*inter, hidden))
        # ends up as base_layer, the last (down_proj, (E, hidden, inter)) outermost
        experts_prefix = f"base_model.model.{layer}.mlp.experts"
        lora[f"{experts_prefix}.base_layer.lora_A.weight"] = rand(experts * r, hidden, dtype=torch.float32)
        lora[f"{experts_prefix}.base_layer.lora_B.weight"] = rand(2 * inter, experts * r, dtype=torch.float32, std=0.002)
        lora[f"{experts_prefix}.lora_A.weight"] = rand(experts * r, inter, dtype=torch.float32)
        lora[f"{experts_prefix}.lora_B.weight"] = rand(hidden, experts * r, dtype=torch.float32, std=0.002)
    shards.add("model.norm.weight", torch.ones(hidden, dtype=torch.bfloat16))
    shards.add("lm_head.weight", rand(vocab, hidden))
    shards.finish()

    save_file(lora, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "peft_version": "0.21.2", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
        "lora_dropout": 0.0, "target_modules": list(attention),
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], "modules_to_save": None,
        "base_model_name_or_path": "synthetic", "bias": "none", "fan_in_fan_out": False, "use_dora": False,
        "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
    }, indent=2))
    return base, adapter


def build(folder: Path, shape: str) -> tuple[Path, Path]:
    if shape in MOE_SHAPES:
        return build_moe(folder, shape)
    import torch
    from safetensors.torch import save_file

    hidden, inter, layers, heads, kv = SHAPES[shape]
    head_dim = hidden // heads
    base, adapter, rand = start_pair(folder)

    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "vocab_size": BASE_VOCAB, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 2,
    }
    (base / "config.json").write_text(json.dumps(config, indent=2))
    linear = {
        "self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv * head_dim, hidden),
        "self_attn.v_proj": (kv * head_dim, hidden), "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter),
    }
    # base shards of about 1 GB, written as they fill
    shard, size, shards, weight_map = {}, 0, [], {}

    def flush():
        nonlocal shard, size
        if shard:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, base / name, metadata={"format": "pt"})
            shards.append(name)
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    def add(name, tensor):
        nonlocal size
        if size + tensor.numel() * 2 > 1_000_000_000:
            flush()
        shard[name] = tensor
        size += tensor.numel() * 2

    add("model.embed_tokens.weight", rand(BASE_VOCAB, hidden))
    lora = {}
    for i in range(layers):
        for name, (out_f, in_f) in linear.items():
            add(f"model.layers.{i}.{name}.weight", rand(out_f, in_f))
            prefix = f"base_model.model.model.layers.{i}.{name}"
            lora[f"{prefix}.lora_A.weight"] = rand(RANK, in_f, dtype=torch.float32)
            lora[f"{prefix}.lora_B.weight"] = rand(out_f, RANK, dtype=torch.float32, std=0.002)
        add(f"model.layers.{i}.input_layernorm.weight", torch.ones(hidden, dtype=torch.bfloat16))
        add(f"model.layers.{i}.post_attention_layernorm.weight", torch.ones(hidden, dtype=torch.bfloat16))
    add("model.norm.weight", torch.ones(hidden, dtype=torch.bfloat16))
    add("lm_head.weight", rand(BASE_VOCAB, hidden))
    flush()
    # rename to the -of-N convention once N is known
    total = len(shards)
    for index, name in enumerate(shards, 1):
        final = f"model-{index:05d}-of-{total:05d}.safetensors"
        (base / name).rename(base / final)
        weight_map = {k: (final if v == name else v) for k, v in weight_map.items()}
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    lora["base_model.model.model.embed_tokens.weight"] = rand(NEW_VOCAB, hidden)
    lora["base_model.model.lm_head.weight"] = rand(NEW_VOCAB, hidden)
    save_file(lora, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 128, "lora_dropout": 0.05,
        "target_modules": [n.split(".")[-1] for n in linear], "modules_to_save": ["embed_tokens", "lm_head"],
        "base_model_name_or_path": "synthetic", "bias": "none", "fan_in_fan_out": False,
    }, indent=2))
    return base, adapter


def run_measured(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process, measured with wait4."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stderr = proc.stderr.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{stderr[-2000:]}")
    return wall, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES) + sorted(MOE_SHAPES), default="1b")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workdir", help="where to build (default: a temporary folder)")
    parser.add_argument("--validate", default="off", choices=["off", "fast"],
                        help="validation during the PEFT engine's timed merges (the stream engine runs with both)")
    parser.add_argument("--skip-peft", action="store_true", help="time only cp and the stream engine")
    parser.add_argument("--skip-validated", action="store_true", help="leave out the stream engine with --validate fast")
    parser.add_argument("--build-only", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_only:
        build(Path(args.build_only), args.shape)
        return

    root = Path(args.workdir or tempfile.mkdtemp(prefix="merger-bench-"))
    try:
        run(args, root)
    finally:  # a failed contender must not leave gigabytes in /tmp
        shutil.rmtree(root / "out", ignore_errors=True)
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


def run(args, root: Path) -> None:
    t0 = time.perf_counter()
    # built in a child: this process must stay small, since a forked child's peak RSS starts from ours
    if not (root / "adapter" / "adapter_config.json").is_file():  # --workdir keeps a built pair for reruns
        subprocess.run([sys.executable, __file__, "--shape", args.shape, "--build-only", str(root)], check=True)
    base, adapter = root / "base", root / "adapter"
    size = sum(p.stat().st_size for p in base.iterdir())
    print(f"built {args.shape}: base {size / 1e9:.2f} GB in {len(list(base.glob('*.safetensors')))} shards, "
          f"adapter {(adapter / 'adapter_model.safetensors').stat().st_size / 1e9:.2f} GB ({time.perf_counter() - t0:.0f}s)", flush=True)

    def merge(engine: str, validate: str):
        return lambda out: [sys.executable, "-m", "merger", "--base", str(base), "--adapter", str(adapter), "--overwrite",
                            "-q", "--validate", validate, "--max-shard-size", "1GB", "--engine", engine, "--out", str(out)]

    contenders = {
        # merger fsyncs what it writes before the rename, so the fair floor syncs too
        "cp -r + sync (floor)": lambda out: ["sh", "-c", f"cp -r '{base}' '{out}' && sync"],
        "stream engine": merge("stream", "off"),
    }
    if not args.skip_validated:
        contenders["stream + validate fast"] = merge("stream", "fast")
    if not args.skip_peft:
        contenders[f"peft engine{' + validate fast' if args.validate == 'fast' else ''}"] = merge("peft", args.validate)
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in contenders}
    for rep in range(args.reps):
        for name, make in contenders.items():  # alternating, so drift hits every contender alike
            out = root / "out"
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run(["sync"])
            wall, rss = run_measured(make(out))
            results[name].append((wall, rss))
            print(f"  rep {rep + 1} {name:28s} {wall:7.1f} s  peak RSS {rss / 1e9:5.2f} GB", flush=True)

    med = {name: (statistics.median(w for w, _ in runs), statistics.median(r for _, r in runs)) for name, runs in results.items()}
    ref = next((value for name, value in med.items() if name.startswith("peft engine")), None)
    print(f"\n| {args.shape} ({size / 1e9:.1f} GB bf16), median of {args.reps} | wall s | peak RSS GB | wall vs peft | RSS vs peft | wall vs cp |")
    print("|---|---|---|---|---|---|")
    for name, (wall, rss) in med.items():
        vs_peft = f"{wall / ref[0]:.2f}x" if ref else "-"
        rss_peft = f"{rss / ref[1]:.2f}x" if ref else "-"
        print(f"| {name} | {wall:.1f} | {rss / 1e9:.2f} | {vs_peft} | {rss_peft} | {wall / med['cp -r + sync (floor)'][0]:.1f}x |")
    if "stream + validate fast" in med:
        (off_wall, off_rss), (fast_wall, fast_rss) = med["stream engine"], med["stream + validate fast"]
        print(f"\nvalidate fast on the stream engine: {fast_wall - off_wall:+.1f} s ({fast_wall / off_wall:.2f}x the merge alone), "
              f"peak RSS {fast_rss / 1e9:.2f} GB vs {off_rss / 1e9:.2f} GB ({fast_rss / off_rss:.2f}x)")


if __name__ == "__main__":
    main()
