"""LoRA arithmetic checked against numbers worked out by hand, and against PEFT's own layers."""

import math

import pytest
import torch

from merger.lora import dora_weight, embedding_delta, grow_rows, linear_delta, lora_scale, pattern_value


def test_linear_delta_by_hand():
    a = torch.tensor([[1.0, 2.0]])  # r=1, in=2
    b = torch.tensor([[3.0], [4.0]])  # out=2, r=1
    assert torch.equal(linear_delta(a, b, 0.5), torch.tensor([[1.5, 3.0], [2.0, 4.0]]))
    assert torch.equal(linear_delta(a, b, 0.5, fan_in_fan_out=True), torch.tensor([[1.5, 2.0], [3.0, 4.0]]))


def test_embedding_delta_by_hand():
    a = torch.tensor([[1.0, 0.0, 2.0]])  # r=1, num=3
    b = torch.tensor([[1.0], [10.0]])  # dim=2, r=1
    assert torch.equal(embedding_delta(a, b, 1.0), torch.tensor([[1.0, 10.0], [0.0, 0.0], [2.0, 20.0]]))


def test_scales():
    assert lora_scale(16, 8, False) == 2.0
    assert lora_scale(16, 64, True) == 2.0
    assert pattern_value({"q_proj": 32}, "model.layers.0.self_attn.q_proj", 8) == 32
    assert pattern_value({"layers.1.self_attn.q_proj": 4}, "model.layers.0.self_attn.q_proj", 8) == 8


def test_dora_by_hand():
    w = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    delta = torch.tensor([[0.0, 4.0], [0.0, 0.0]])
    magnitude = torch.tensor([10.0, 1.0])
    # row 0: (3, 4) has norm 5 -> scaled to norm 10; row 1: (0, 2) -> norm 1
    assert torch.allclose(dora_weight(w, delta, magnitude), torch.tensor([[6.0, 8.0], [0.0, 1.0]]))


def test_grow_rows_rules():
    w = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    assert torch.equal(grow_rows(w, 3, "mean")[2], torch.tensor([2.0, 4.0]))
    assert torch.equal(grow_rows(w, 3, "zeros")[2], torch.tensor([0.0, 0.0]))
    assert torch.equal(grow_rows(w, 1), w[:1])


@pytest.mark.parametrize("use_rslora", [False, True])
def test_matches_peft_linear_merge(use_rslora):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5))
    peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=7, target_modules=["0"], use_rslora=use_rslora, init_lora_weights=False))
    layer = peft.base_model.model[0]
    expected = layer.base_layer.weight.detach() + layer.get_delta_weight("default").detach()
    got = layer.base_layer.weight.detach() + linear_delta(layer.lora_A["default"].weight, layer.lora_B["default"].weight, lora_scale(7, 2, use_rslora))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert math.isclose(layer.scaling["default"], lora_scale(7, 2, use_rslora))


@pytest.mark.parametrize("layer", ["linear", "embedding"])
def test_matches_peft_dora_merge(layer):
    # a Linear normalises per output row; PEFT normalises an Embedding (num, dim) per dimension
    # over all rows, as it does a Conv1D, so its magnitude has one entry per dimension
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    module = torch.nn.Linear(6, 5) if layer == "linear" else torch.nn.Embedding(7, 4)
    peft = get_peft_model(torch.nn.Sequential(module), LoraConfig(r=2, lora_alpha=4, target_modules=["0"], use_dora=True,
                                                                  init_lora_weights=False))
    lora = peft.base_model.model[0]
    with torch.no_grad():
        lora.lora_magnitude_vector["default"].weight.mul_(1.5)
    magnitude = lora.lora_magnitude_vector["default"].weight.detach()
    base = lora.base_layer.weight.detach().clone()
    if layer == "linear":
        delta = linear_delta(lora.lora_A["default"].weight, lora.lora_B["default"].weight, lora.scaling["default"])
        got = dora_weight(base, delta, magnitude)
    else:
        assert magnitude.shape == (4,)
        delta = embedding_delta(lora.lora_embedding_A["default"], lora.lora_embedding_B["default"], lora.scaling["default"])
        got = dora_weight(base, delta, magnitude, fan_in_fan_out=True)
    lora.merge()
    torch.testing.assert_close(got, lora.base_layer.weight.detach(), rtol=1e-5, atol=1e-6)
