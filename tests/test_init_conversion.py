"""PiSSA-family adapters saved without PEFT's conversion: every route merger offers, proven
against the trained model itself (PEFT's residual base + the trained adapter, unmerged)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from .factories import ALL_LLAMA_LINEAR, llama_config, make_tokenizer, perturb_trainable

FP32_TOL = 1e-5  # W_res + s·BA against W + s·(BA - B0A0): fp32 rounding of the SVD split only
PROBE = torch.tensor([[1, 5, 9, 17, 33, 60, 63, 2]])


def build_pissa_run(root, init: str):
    """A base, and a training run started with ``init_lora_weights=init``, saved every way users save it."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(llama_config(64)).save_pretrained(root / "base")
    make_tokenizer(64).save_pretrained(root / "base")
    model = LlamaForCausalLM.from_pretrained(root / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LLAMA_LINEAR, init_lora_weights=init))
        # the initial adapter, as LLaMA-Factory's pissa_convert saves it before training (init reset to True)
        peft_model.peft_config["default"].init_lora_weights = True
        peft_model.save_pretrained(root / "pissa_init")
        peft_model.peft_config["default"].init_lora_weights = init
        perturb_trainable(peft_model, seed=1)
        with torch.no_grad():
            truth = peft_model.eval()(input_ids=PROBE).logits
        peft_model.save_pretrained(root / "unconverted")
        peft_model.save_pretrained(root / "converted", path_initial_model_for_weight_conversion=str(root / "pissa_init"))
        peft_model.unload().save_pretrained(root / "residual")  # the base PEFT rewrote when training started
    return truth


@pytest.fixture(scope="module", params=["pissa", "pissa_niter_4", "olora"])
def run(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    return request.param, root, build_pissa_run(root, request.param)


def logits(out):
    from transformers import LlamaForCausalLM

    with torch.no_grad():
        return LlamaForCausalLM.from_pretrained(out).eval()(input_ids=PROBE).logits


def assert_trained_model(out, truth):
    err = ((logits(out) - truth).abs().max() / truth.abs().max()).item()
    assert err < FP32_TOL, err


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["stream", "peft"])
def test_every_route_gives_the_trained_model(run, tmp_path, engine):
    from merger import merge_adapter

    init, root, truth = run
    routes = {
        "converted by PEFT": dict(base=root / "base", adapter=root / "converted"),
        "--residual-base": dict(base=root / "residual", adapter=root / "unconverted", residual_base=True),
        "--initial-adapter": dict(base=root / "base", adapter=root / "unconverted", initial_adapter=str(root / "pissa_init")),
    }
    for name, kwargs in routes.items():
        out = tmp_path / name.strip("-").replace(" ", "-")
        result = merge_adapter(kwargs.pop("base"), kwargs.pop("adapter"), out, engine=engine, validate="full", quiet=True, **kwargs)
        assert result.validation.ok, (name, result.validation.findings)
        assert_trained_model(out, truth)
        assert not list(tmp_path.glob(".*tmp-*")), "the converted adapter's scratch folder is removed"
    report = json.loads((tmp_path / "initial-adapter" / "merge_report.json").read_text())
    assert report["inputs"]["initial_adapter"] == str(root / "pissa_init")
    assert "initial adapter" in report["inputs"]["sha256"]


def test_unconverted_into_the_original_base_is_refused(run, tmp_path, capsys):
    from merger.cli import main

    init, root, _ = run
    out = tmp_path / "out"
    assert main(["--base", str(root / "base"), "--adapter", str(root / "unconverted"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"init_lora_weights={init!r}" in err and "path_initial_model_for_weight_conversion" in err and err.count("\n") == 1
    assert not out.exists()


def test_wrong_use_of_the_flags_is_refused(run, tmp_path, capsys):
    from merger.cli import main

    _, root, _ = run
    out = tmp_path / "out"
    cases = [
        # a converted (ordinary) adapter has no residual base
        (["--base", str(root / "base"), "--adapter", str(root / "converted"), "--residual-base"], "drop --residual-base"),
        (["--base", str(root / "base"), "--adapter", str(root / "converted"), "--initial-adapter", str(root / "pissa_init")],
         "drop --initial-adapter"),
        (["--base", str(root / "base"), "--adapter", str(root / "unconverted"), "--initial-adapter", str(root / "pissa_init"),
          "--residual-base"], "give one"),
    ]
    for args, fragment in cases:
        assert main(args + ["--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert fragment in err and err.count("\n") == 1, err
        assert not out.exists()


def test_an_initial_adapter_of_another_run_is_refused(run, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    from merger.cli import main

    _, root, _ = run
    other = tmp_path / "other_init"
    shutil.copytree(root / "pissa_init", other)
    tensors = load_file(other / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = tensors[key][:2]  # another rank
    save_file(tensors, other / "adapter_model.safetensors")
    out = tmp_path / "out"
    assert main(["--base", str(root / "base"), "--adapter", str(root / "unconverted"), "--initial-adapter", str(other),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "another rank or model" in err and err.count("\n") == 1, err
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_an_embedding_lora_cannot_be_converted_and_says_so(run, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    from merger.cli import main

    _, root, _ = run
    adapter = tmp_path / "with-embedding"
    shutil.copytree(root / "unconverted", adapter)
    weights = load_file(adapter / "adapter_model.safetensors")
    weights["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 64)
    weights["base_model.model.model.embed_tokens.lora_embedding_B"] = torch.zeros(32, 4)
    save_file(weights, adapter / "adapter_model.safetensors")
    out = tmp_path / "out"
    assert main(["--base", str(root / "base"), "--adapter", str(adapter), "--initial-adapter", str(root / "pissa_init"),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "PEFT's conversion does not carry" in err and "--residual-base" in err and err.count("\n") == 1, err
    assert not out.exists()
