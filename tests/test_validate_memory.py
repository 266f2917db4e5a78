"""Validation reads row blocks, never whole tensors, and still catches each fault in any block.

``merger.validate.BLOCK_BYTES`` is shrunk so tiny tensors span many blocks: a fault placed in the
last block (or a block other than the first) must be found as it was when whole tensors were read.
"""

import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import merger.validate as validate
import merger.validation_io as validation_io
from merger import merge_adapter, validate_checkpoint

ROW = 32 * 4  # one float32 row of the demo model (hidden size 32)


@pytest.fixture(scope="module")
def merged(tmp_path_factory, demo_pair):
    base, adapter = demo_pair
    result = merge_adapter(base, adapter, tmp_path_factory.mktemp("blocks") / "out", validate="off")
    return base, adapter, result.out


@pytest.fixture
def broken(merged, tmp_path):
    base, adapter, out = merged
    shutil.copytree(out, tmp_path / "out")
    return base, adapter, tmp_path / "out"


@pytest.fixture
def small_blocks(monkeypatch):
    """Two rows of the demo model per block."""
    monkeypatch.setattr(validation_io, "BLOCK_BYTES", 2 * ROW)


def edit_weights(out, change):
    path = out / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def findings(out, base, adapter):
    report = validate_checkpoint(out, base, adapter, mode="fast")
    return {f.code for f in report.findings}, report


def message(report, code):
    return next(f.message for f in report.findings if f.code == code)


# ------------------------------------------------------------------------------- the block helpers


@pytest.mark.parametrize("shape,block", [((7, 5), 40), ((2, 3, 8), 32), ((2, 3, 8), 4), ((11,), 12), ((3, 0), 8), ((4, 1), 1)])
def test_index_blocks_cover_every_element_once_within_a_block(monkeypatch, shape, block):
    monkeypatch.setattr(validation_io, "BLOCK_BYTES", block)
    seen = torch.zeros(shape, dtype=torch.int64)
    for index in validate.index_blocks(shape):
        piece = seen[index]
        assert piece.numel() * 4 <= max(block, shape[-1] * 4)  # one innermost row at least
        seen[index] += 1
    assert bool((seen == 1).all())


class FakeTensors:
    def __init__(self, tensor):
        self.tensor, self.reads = tensor, []

    def pieces(self, key, indexes):
        self.reads.extend(indexes)
        return [self.tensor[index] for index in indexes]


def test_gather_reads_one_piece_per_run_and_keeps_the_order():
    tensor = torch.arange(40.0).view(10, 4)
    fake = FakeTensors(tensor)
    rows = [7, 2, 3, 4, 9, 2]
    assert torch.equal(validate.gather(fake, "t", rows), tensor[rows])
    assert fake.reads == [(slice(2, 5),), (slice(7, 8),), (slice(9, 10),)]
    assert torch.equal(validate.gather(FakeTensors(tensor), "t", [3, 1, 0], dim=1), tensor[:, [3, 1, 0]])


# ------------------------------------------------------------------------ good merges, tiny blocks


@pytest.mark.parametrize("name", ["gpt2_conv1d", "dora_rslora", "dora_on_embedding", "lora_on_embed_and_head",
                                  "trainable_tokens_untied", "bf16_sharded"])
def test_a_good_merge_passes_at_any_block_size(scenario_cache, tmp_path, monkeypatch, name):
    """Conv1D input-row blocks, DoRA norms over blocks, grown rows, token rows, shards: the same
    verdict and the same errors (to rounding) whatever the block size."""
    sc = scenario_cache(name)
    engine = "peft" if name == "dora_on_embedding" else "stream"
    result = merge_adapter(sc.base_dir, sc.adapter_dir, tmp_path / "out", validate="off", engine=engine)
    reports = []
    for block in (16 << 20, 4 * ROW, 1):
        monkeypatch.setattr(validation_io, "BLOCK_BYTES", block)
        reports.append(validate.validate_output(result.out, result.plan, "fast"))
    whole = reports[0]
    assert whole.ok, whole.findings
    for report in reports[1:]:
        assert report.ok and report.checks == whole.checks
        for key, value in whole.metrics.items():
            if isinstance(value, float):
                assert math.isclose(report.metrics[key], value, rel_tol=0.5, abs_tol=1e-6), key


def test_validation_reads_nothing_bigger_than_a_block(merged, monkeypatch):
    """Every read of the output or the base is one block at most; whole reads are the adapter's small
    LoRA matrices only."""
    base, adapter, out = merged
    block = 4 * ROW
    monkeypatch.setattr(validation_io, "BLOCK_BYTES", block)
    pieces, wholes = [], []
    real_pieces, real_read = validate.LibraryTensors.pieces, validate.LibraryTensors.read

    def spy_pieces(self, key, indexes):
        got = real_pieces(self, key, indexes)
        pieces.extend((self.folder.name, key, p.numel() * 4) for p in got)
        return got

    def spy_read(self, key):
        got = real_read(self, key)
        wholes.append((self.folder.name, key, got.numel()))
        return got

    monkeypatch.setattr(validate.LibraryTensors, "pieces", spy_pieces)
    monkeypatch.setattr(validate.LibraryTensors, "read", spy_read)
    codes, _ = findings(out, base, adapter)
    assert codes == set()
    assert max(size for _, _, size in pieces) <= block
    assert {folder for folder, _, _ in pieces} == {"out", "base", "adapter"}
    assert len({key for folder, key, _ in pieces if folder == "out"}) == len(load_file(out / "model.safetensors"))
    assert all(folder == "adapter" and "lora_" in key for folder, key, _ in wholes), wholes


# ------------------------------------------------------------------ faults beyond the first block


@pytest.mark.parametrize("key,where", [("model.layers.1.mlp.down_proj.weight", (-1, -1)), ("model.norm.weight", (-1,)),
                                       ("model.embed_tokens.weight", (40, 3))])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_in_a_late_block(broken, monkeypatch, key, where, value):
    base, adapter, out = broken
    monkeypatch.setattr(validation_io, "BLOCK_BYTES", 16)  # 4 elements per block: a row of 32 spans 8 blocks
    edit_weights(out, lambda t: t[key].__setitem__(where, value))
    codes, report = findings(out, base, adapter)
    assert "non-finite" in codes
    assert message(report, "non-finite") == f"{key}: holds NaN or Inf values"


@pytest.mark.parametrize("rows", [slice(-1, None), slice(20, 24)])
def test_lora_lost_in_a_late_block(broken, small_blocks, rows):
    base, adapter, out = broken
    key = "model.layers.1.self_attn.q_proj.weight"
    base_q = load_file(base / "model.safetensors")[key]
    edit_weights(out, lambda t: t[key][rows].copy_(base_q[rows]))
    codes, report = findings(out, base, adapter)
    assert codes == {"lora-not-merged"}
    assert message(report, "lora-not-merged").startswith(f"{key}: W_merged·x differs from W·x + s·B(A·x) by ")


@pytest.mark.parametrize("key", ["model.embed_tokens.weight", "lm_head.weight"])
def test_lost_last_new_token_row(broken, small_blocks, key):
    base, adapter, out = broken
    edit_weights(out, lambda t: t[key][-1].zero_())
    codes, report = findings(out, base, adapter)
    assert codes == {"new-rows-lost"}
    assert message(report, "new-rows-lost").startswith(f"{key}: rows 64-79 differ from the adapter's trained values by ")


def test_copy_differs_in_the_last_block(broken, monkeypatch):
    base, adapter, out = broken
    monkeypatch.setattr(validation_io, "BLOCK_BYTES", 16)  # 4 elements of the 32-element norm per block
    edit_weights(out, lambda t: t["model.norm.weight"][-1].add_(1.0))
    codes, report = findings(out, base, adapter)
    assert codes == {"copy-differs"}
    assert message(report, "copy-differs") == ("model.norm.weight: differs from the base tensor it copies "
                                               "(read back through the safetensors library)")


def test_conv1d_lora_lost_in_the_last_input_rows(scenario_cache, tmp_path, monkeypatch):
    """GPT-2 Conv1D weights are (in, out): blocks run over input rows and their products are summed."""
    sc = scenario_cache("gpt2_conv1d")
    result = merge_adapter(sc.base_dir, sc.adapter_dir, tmp_path / "out", validate="off", engine="stream")
    monkeypatch.setattr(validation_io, "BLOCK_BYTES", 4 * 96 * 4)
    op = next(op for op in validate._sample([op for op in result.plan.ops if op.lora]) if op.lora.kind == "conv1d" and op.shape[0] > 8)
    base_w = load_file(next(sc.base_dir.glob("*.safetensors")))[op.base_key]
    shard = next(p for p in result.out.glob("*.safetensors") if op.out_key in load_file(p))
    tensors = load_file(shard)
    tensors[op.out_key][-2:] = base_w[-2:].to(tensors[op.out_key].dtype)
    save_file(tensors, shard, metadata={"format": "pt"})
    report = validate.validate_output(result.out, result.plan, "fast")
    assert {f.code for f in report.findings} == {"lora-not-merged"}
    assert message(report, "lora-not-merged").startswith(f"{op.out_key}: W_merged·x differs")


@pytest.mark.parametrize("name", ["dora_rslora", "dora_on_embedding"])
def test_dora_magnitude_lost_in_a_late_block(scenario_cache, tmp_path, monkeypatch, name):
    """DoRA: rows past the first blocks merged without the magnitude rescale are caught."""
    sc = scenario_cache(name)
    engine = "peft" if name == "dora_on_embedding" else "stream"
    result = merge_adapter(sc.base_dir, sc.adapter_dir, tmp_path / "out", validate="off", engine=engine)
    monkeypatch.setattr(validation_io, "BLOCK_BYTES", 2 * ROW)
    op = next(op for op in validate._sample([op for op in result.plan.ops if op.lora])
              if op.lora.magnitude_key and (op.lora.kind == "embedding") == (name == "dora_on_embedding"))
    shard = next(p for p in result.out.glob("*.safetensors") if op.out_key in load_file(p))
    tensors = load_file(shard)
    half = tensors[op.out_key].shape[0] // 2
    tensors[op.out_key][half:] *= 1.5
    save_file(tensors, shard, metadata={"format": "pt"})
    report = validate.validate_output(result.out, result.plan, "fast")
    assert "lora-not-merged" in {f.code for f in report.findings}
    assert any(f.message.startswith(f"{op.out_key}: W_merged·x differs") for f in report.findings)


def test_small_tensors_read_in_groups_are_each_checked(tmp_path):
    """Tensors under a block are read many per opening of their file; a bad value in any of them is named."""
    from merger.validation_io import LibraryTensors, non_finite_tensors
    from merger.tensors import read_safetensors_header

    tensors = {f"t{i}": torch.randn(8, 8) for i in range(40)}
    tensors["t7"][2, 2] = float("inf")
    tensors["t33"][0, 1] = float("nan")
    save_file(tensors, tmp_path / "model.safetensors")
    metas = read_safetensors_header(tmp_path / "model.safetensors")
    reader, opened = LibraryTensors(tmp_path, metas), []
    real = reader.wholes
    reader.wholes = lambda keys: opened.append(len(keys)) or real(keys)
    assert non_finite_tensors(reader, metas, set(metas)) == ["t33", "t7"]
    assert opened == [40]  # one opening for all of them
