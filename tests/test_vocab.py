"""The vocabulary rules on paper: plain ints in, rows and stories out."""

import pytest

from merger.errors import IncompatibleError
from merger.vocab import Evidence, decide_side, explain_rows, follow_other_side, pad_multiple


@pytest.mark.parametrize(
    "rows, tokens, multiple",
    [(32064, 32002, 64), (80, 65, 16), (32008, 32001, 8), (128, 102, 32), (67, 67, None), (151936, 151646, None)],
)
def test_pad_multiple(rows, tokens, multiple):
    assert pad_multiple(rows, tokens) == multiple


def test_explain_rows_llava_story():
    assert explain_rows(32064, 32002) == "32064 rows = 32002 tokens padded to a multiple of 64"
    assert explain_rows(67, 67) == "67 rows = 67 tokens"
    assert explain_rows(151936, 151646) == "151936 rows for 151646 tokens (290 spare rows)"
    assert explain_rows(32002, 32005) == "32002 rows for 32005 tokens (ids 32002-32004 have no row)"


def test_adapter_tensors_decide_not_the_tokenizer():
    d = decide_side("embed_tokens", 32000, [Evidence(32064, "embed_tokens.weight")], 32002, None, None)
    assert d.rows == 32064 and d.source == "adapter"
    assert d.story == "embed_tokens: 32064 rows = 32002 tokens padded to a multiple of 64 (base: 32000), from the adapter's tensors"
    assert d.untrained_new_rows == []


def test_padded_base_is_never_shrunk_by_the_tokenizer():
    d = decide_side("embed_tokens", 151936, [], 151648, None, ())
    assert d.rows == 151936 and d.source == "base"
    assert "never shrunk" in d.story


def test_smaller_adapter_tensors_do_shrink_and_say_so():
    d = decide_side("embed_tokens", 151936, [Evidence(151665, "embed_tokens.weight")], 151665, None, None)
    assert d.rows == 151665
    assert "shrinks by 271 rows" in d.story


def test_no_saved_rows_grows_to_tokenizer_and_names_untrained_rows():
    d = decide_side("embed_tokens", 32000, [], 32001, None, ())
    assert d.rows == 32001 and d.untrained_new_rows == [32000]
    assert "never trained" in d.story


def test_pad_option_only_applies_without_tensor_evidence():
    d = decide_side("embed_tokens", 32000, [], 32001, 64, ())
    assert d.rows == 32064
    d = decide_side("embed_tokens", 32000, [Evidence(32008, "x")], 32001, 64, None)
    assert d.rows == 32008


def test_trainable_token_indices_are_a_lower_bound():
    d = decide_side("embed_tokens", 64, [Evidence(67, "trainable token ids up to 66", exact=False)], None, None, (64, 65, 66))
    assert d.rows == 67 and d.untrained_new_rows == []


def test_disagreeing_tensors_are_refused_with_both_sizes():
    with pytest.raises(IncompatibleError, match=r"a.weight: 80, b.lora_embedding_A: 96"):
        decide_side("embed_tokens", 64, [Evidence(80, "a.weight"), Evidence(96, "b.lora_embedding_A")], 67, None, None)


def test_head_without_evidence_grows_with_embedding():
    embed = decide_side("embed_tokens", 64, [Evidence(80, "e")], 67, None, None)
    head = follow_other_side("lm_head", 64, embed, 67, ())
    assert head.rows == 80 and head.untrained_new_rows == list(range(64, 80))
    assert "grown with embed_tokens" in head.story


def test_rows_sized_by_a_lora_update_but_without_values_are_said_out_loud():
    # LoRA on the embedding saved with save_embedding_layers=False: lora_embedding_A has 80 columns,
    # but no values for rows 64-79 beyond the update
    d = decide_side("embed_tokens", 64, [Evidence(80, "embed_tokens.lora_embedding_A")], 67, None, ())
    assert d.rows == 80 and d.untrained_new_rows == list(range(64, 80))
    assert d.story.endswith("; the adapter saved no values for rows 64-79 (only updates), so they start from the new-rows rule")
    assert d.notes == ("embed_tokens: rows 64-79 start from the new-rows rule: the adapter saved no values for them",)
