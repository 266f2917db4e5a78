"""A base that runs its own code (config.json auto_map, like Qwen-1 or ChatGLM): merged with
--trust-remote-code, proven by the logits check, and written with its code files so that
from_pretrained(OUT, trust_remote_code=True) works."""

import json

import pytest
import torch

from merger import UnsupportedError, merge_adapter

CONFIG_PY = '''
from transformers import PretrainedConfig

class TinyConfig(PretrainedConfig):
    model_type = "tinycustom"

    def __init__(self, vocab_size=64, hidden_size=16, **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        super().__init__(**kwargs)
'''

MODELING_PY = '''
import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_tiny import TinyConfig


class TinyForCausalLM(PreTrainedModel):
    config_class = TinyConfig
    _no_split_modules = []

    def __init__(self, config):
        super().__init__(config)
        self.wte = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.mix = torch.nn.Linear(config.hidden_size, config.hidden_size)
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, **kwargs):
        return CausalLMOutput(logits=self.lm_head(torch.tanh(self.mix(self.wte(input_ids)))))
'''


@pytest.fixture
def custom_pair(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    base = tmp_path / "base"
    base.mkdir()
    (base / "configuration_tiny.py").write_text(CONFIG_PY)
    (base / "modeling_tiny.py").write_text(MODELING_PY)
    (base / "config.json").write_text(json.dumps({
        "model_type": "tinycustom", "architectures": ["TinyForCausalLM"], "vocab_size": 64, "hidden_size": 16,
        "tie_word_embeddings": False,
        "auto_map": {"AutoConfig": "configuration_tiny.TinyConfig", "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"},
    }))
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(base, trust_remote_code=True)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    model.save_pretrained(base)
    for name in ("configuration_tiny.py", "modeling_tiny.py"):  # save_pretrained may rewrite them; keep ours
        (base / name).write_text(CONFIG_PY if name.startswith("config") else MODELING_PY)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, trust_remote_code=True),
                                LoraConfig(r=4, target_modules=["mix"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    return base, tmp_path / "adapter", peft_model.eval()


def test_custom_code_needs_the_users_consent(custom_pair, tmp_path):
    base, adapter, _ = custom_pair
    with pytest.raises(UnsupportedError, match=r"the base runs its own code \(modeling_tiny.TinyForCausalLM\); pass --trust-remote-code"):
        merge_adapter(base, adapter, tmp_path / "out")


def test_custom_code_is_merged_proven_and_shipped(custom_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    base, adapter, reference = custom_pair
    result = merge_adapter(base, adapter, tmp_path / "out", trust_remote_code=True, validate="full")
    assert result.validation.ok and result.validation.metrics["logits_checked"] is True
    assert {"configuration_tiny.py", "modeling_tiny.py"} <= {p.name for p in result.out.iterdir()}
    merged = AutoModelForCausalLM.from_pretrained(result.out, trust_remote_code=True).eval()
    ids = torch.tensor([[1, 5, 9, 33, 63]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_custom_code_files_that_are_missing_are_named(custom_pair, tmp_path):
    from merger import CheckpointError

    base, adapter, _ = custom_pair
    (base / "modeling_tiny.py").unlink()
    with pytest.raises(CheckpointError, match=r"config.json: its auto_map names modeling_tiny.py, which the folder does not have; download the model's code files"):
        merge_adapter(base, adapter, tmp_path / "out", trust_remote_code=True)
