"""The streaming engine: one tensor at a time, in row blocks, one input file open at a time.

Peak memory is a few row blocks (about 16 MB of float32 each) plus the process itself, whatever
the model's size. Profiling a prototype showed the time going to allocation, not arithmetic (a
fresh 20-50 MB tensor per step means millions of page faults), so everything goes through
reused buffers: source rows are read with pread straight into them, LoRA updates are one in-place
``addmm_`` per block, and a background thread writes block N while block N+1 is computed.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import UnsupportedError
from ..lora import dora_weight, embedding_delta, linear_delta
from ..options import parse_size
from ..plan import MergePlan, TensorOp
from ..shards import OutTensor, ShardWriter, plan_shards, write_index
from ..tensors import DTYPE_SIZES, SAFETENSORS_TAGS, TORCH_NAMES, TensorMeta, numel

log = logging.getLogger(__name__)

BLOCK_BYTES = 16 << 20  # float32 work per row block: big enough for fast GEMMs, small enough to stay in memory budgets


def stream_blockers(plan: MergePlan) -> list[str]:
    """Why this plan (every stage of it) cannot run on the streaming engine (empty when it can)."""
    blockers = [b for stage in plan.stages for b in stage.stream_blockers]
    if plan.first.base.format != "safetensors":
        blockers.append("the base is stored as pytorch_model.bin")
    if plan.layout.config_overrides:
        blockers.append("the output needs a different model class than the base")
    return list(dict.fromkeys(blockers))


def output_tensors(plan: MergePlan) -> list[OutTensor]:
    out_tag = SAFETENSORS_TAGS[plan.dtype]
    specs = []
    for op in plan.ops:
        source = plan.base.tensors[op.base_key] if op.base_key is not None else plan.adapter.tensors[op.replace_key]
        specs.append(OutTensor(op.out_key, op.shape, out_tag if op.cast else source.dtype))
    return specs


def pick_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UnsupportedError(f"--device {requested}: no CUDA GPU is visible to torch; use --device cpu")
    return requested


def idle_cores(window: float = 0.05) -> float:
    """Cores idle right now, from two /proc/stat samples (load averages lag by a minute)."""
    def sample():
        with open("/proc/stat") as handle:
            fields = [int(x) for x in handle.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    try:
        idle0, total0 = sample()
        import time

        time.sleep(window)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return float(os.cpu_count() or 1)
    cores = os.cpu_count() or 1
    return cores * (idle1 - idle0) / max(1, total1 - total0)


@contextmanager
def cpu_threads():
    """As many torch threads as cores are idle: threads spinning against a busy core stall each
    other (measured on a prototype: 50-60 s instead of 9 s with the second of two cores busy)."""
    import torch

    before = torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, min(cores, round(idle_cores()))))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Scratch:
    """Flat buffers reused across blocks, one per (purpose, dtype), grown to the largest request."""

    def __init__(self, device: str):
        self.device = device
        self.buffers: dict = {}

    def take(self, purpose: str, shape, dtype):
        import torch

        count = numel(shape)
        buf = self.buffers.get((purpose, dtype))
        if buf is None or buf.numel() < count:
            buf = torch.empty(count, dtype=dtype, device=self.device)
            self.buffers[(purpose, dtype)] = buf
        return buf[:count].view(tuple(shape))


class TensorFiles:
    """Tensors of one folder's safetensors files, read by byte offset (pread) into caller buffers.

    No mmap: mapped pages count as the process's memory, and a merge touches every byte once.
    One file is open at a time.
    """

    def __init__(self, folder: Path, metas: dict[str, TensorMeta]):
        self.folder, self.metas = folder, metas
        self.fd = None
        self.name = None

    def torch_dtype(self, key: str):
        import torch

        name = TORCH_NAMES.get(self.metas[key].dtype)
        return getattr(torch, name) if name else None

    def rows(self, key: str) -> int:
        shape = self.metas[key].shape
        return shape[0] if shape else 1

    def read_rows(self, key: str, start: int, stop: int, into) -> None:
        """Rows [start, stop) of ``key`` into the contiguous CPU tensor ``into``."""
        import torch

        meta = self.metas[key]
        if self.name != meta.file:
            self.close()
            self.fd = os.open(self.folder / meta.file, os.O_RDONLY)
            self.name = meta.file
        row_bytes = numel(meta.shape[1:]) * DTYPE_SIZES[meta.dtype] if meta.shape else DTYPE_SIZES[meta.dtype]
        view = memoryview(into.reshape(-1).view(torch.uint8).numpy())
        position, got, need = meta.offset + start * row_bytes, 0, (stop - start) * row_bytes
        while got < need:
            chunk = os.preadv(self.fd, [view[got:need]], position + got)
            if chunk <= 0:
                raise OSError(f"{self.folder / meta.file}: ended early while reading {key}")
            got += chunk

    def read(self, key: str):
        """The whole tensor in a fresh CPU tensor (for small adapter tensors and non-float tensors)."""
        import torch

        meta = self.metas[key]
        dtype = self.torch_dtype(key)
        if dtype is None:
            from safetensors import safe_open

            with safe_open(str(self.folder / meta.file), framework="pt") as handle:
                return handle.get_tensor(key)
        out = torch.empty(meta.shape, dtype=dtype)
        self.read_rows(key, 0, meta.shape[0] if meta.shape else 1, out)
        return out

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
        self.fd = self.name = None


class PickledTensors:
    """Legacy .bin files (adapter_model.bin, pytorch_model*.bin), loaded with weights_only=True
    (a pickle has no header to seek in)."""

    def __init__(self, *paths: Path):
        import torch

        self.state = {}
        for path in paths:
            self.state.update(torch.load(path, map_location="cpu", weights_only=True))

    def read(self, key: str):
        return self.state[key]

    def rows(self, key: str) -> int:
        shape = self.state[key].shape
        return shape[0] if len(shape) else 1

    def read_rows(self, key: str, start: int, stop: int, into) -> None:
        into.copy_(self.state[key][start:stop])

    def torch_dtype(self, key: str):
        return self.state[key].dtype

    def close(self) -> None:
        self.state = {}


def open_adapter(plan: MergePlan):
    """A reader of the adapter's tensors (``read(key)``, ``read_rows``); close() when done."""
    return open_tensors(plan.adapter.folder, plan.adapter.weights_file, plan.adapter.tensors)


def open_tensors(folder: Path, weights_file: str, metas: dict):
    """A reader of one weights file's tensors, safetensors (by offset) or a legacy .bin."""
    if weights_file.endswith(".safetensors"):
        return TensorFiles(folder, metas)
    return PickledTensors(folder / weights_file)


def open_base(plan: MergePlan):
    """A reader of the base's tensors (``read(key)``); close() when done."""
    if plan.base.format == "safetensors":
        return TensorFiles(plan.base.folder, plan.base.tensors)
    return PickledTensors(*(plan.base.folder / name for name in plan.base.files))


class AsyncWriter:
    """Two output buffers: the writer thread drains one while the next block fills the other."""

    def __init__(self, pool: ThreadPoolExecutor):
        self.pool = pool
        self.host = Scratch("cpu")
        self.pending: list[Future | None] = [None, None]
        self.turn = 0

    def acquire(self, shape, dtype):
        slot = self.turn % 2
        if self.pending[slot] is not None:
            self.pending[slot].result()
            self.pending[slot] = None
        return self.host.take(f"out{slot}", shape, dtype)

    def submit(self, writer: ShardWriter, name: str, block) -> None:
        self.pending[self.turn % 2] = self.pool.submit(writer.write, name, block)
        self.turn += 1

    def drain(self) -> None:
        for i, future in enumerate(self.pending):
            if future is not None:
                future.result()
                self.pending[i] = None


class OpRunner:
    """Executes TensorOps block by block: start rows, grown rows, token rows, LoRA, cast, write."""

    def __init__(self, plan: MergePlan, device: str, base, adapter, out: AsyncWriter | None, reader: ThreadPoolExecutor | None = None):
        import torch

        self.plan, self.device, self.base, self.adapter, self.out = plan, device, base, adapter, out
        self.reader = reader  # a thread that reads the next block's source rows while this one is computed
        self.work = Scratch(device)
        self.host_in = Scratch("cpu")
        self.out_dtype = getattr(torch, plan.dtype)
        self.prepared: tuple[str, _Prepared] | None = None
        self.stats: dict = {}  # what the report records of this run (--merge-base nf4: the measured difference)

    def source_of(self, op: TensorOp):
        return (self.adapter, op.replace_key) if op.replace_key else (self.base, op.base_key)

    def run(self, op: TensorOp, writer: ShardWriter) -> None:
        source, key = self.source_of(op)
        src_dtype = source.torch_dtype(key)
        if src_dtype is None or not src_dtype.is_floating_point or not op.shape:
            tensor = source.read(key)  # integers, bools and scalars: tiny, written as they are
            if op.cast and tensor.is_floating_point():
                tensor = tensor.to(self.out_dtype)
            writer.write(op.out_key, tensor)
            return
        out_rows, rest = op.shape[0], tuple(op.shape[1:])
        out_dtype = self.out_dtype if op.cast else src_dtype
        if is_plain(op, source.rows(key)) and out_dtype == src_dtype:  # a copy: source bytes straight into the output buffer
            step = max(1, BLOCK_BYTES // max(1, numel(rest) * 4))
            for i in range(0, out_rows, step):
                j = min(out_rows, i + step)
                block = self.out.acquire((j - i,) + rest, out_dtype)
                source.read_rows(key, i, j, block)
                self.out.submit(writer, op.out_key, block)
            return
        prepared = self.prepare(op)
        blocks = [(i, min(out_rows, i + prepared.step)) for i in range(0, out_rows, prepared.step)]
        for (i, j), staged in zip(blocks, self._staged_blocks(op, prepared, blocks), strict=True):
            work = self.compute(op, prepared, i, j, staged)
            block = self.out.acquire((j - i,) + rest, out_dtype)
            block.copy_(work)
            self.out.submit(writer, op.out_key, block)

    def _staged_blocks(self, op: TensorOp, prepared: "_Prepared", blocks: list[tuple[int, int]]):
        """Each block's source rows, read one block ahead on the reader thread into two alternating
        buffers, so the disk works while the previous block's GEMM runs (None: nothing to read, or
        no reader thread: compute reads it itself)."""
        if self.reader is None or prepared.start is not None:
            yield from (None for _ in blocks)
            return
        source, key = self.source_of(op)
        rest, dtype = tuple(op.shape[1:]), source.torch_dtype(key)

        def read(n: int):
            i, j = blocks[n]
            k = min(j, prepared.src_rows)
            if i >= k:
                return None
            staging = self.host_in.take(f"ahead{n % 2}", (k - i,) + rest, dtype)
            source.read_rows(key, i, k, staging)
            return staging

        future = self.reader.submit(read, 0)
        for n in range(len(blocks)):
            staged = future.result()
            if n + 1 < len(blocks):  # block n's buffer is not reused before block n+2, after n is computed
                future = self.reader.submit(read, n + 1)
            yield staged

    def prepare(self, op: TensorOp) -> "_Prepared":
        """What every block of ``op`` needs: the grown rows' value, token rows, LoRA tensors (cached for
        the op most recently prepared: a later stage reads one tensor's blocks in order)."""
        if self.prepared is not None and self.prepared[0] == op.out_key:
            return self.prepared[1]
        source, key = self.source_of(op)
        src_rows, rest = source.rows(key), tuple(op.shape[1:])
        dora_whole = op.lora is not None and op.lora.magnitude_key is not None and op.lora.kind != "linear"
        prepared = _Prepared(
            src_rows=src_rows,
            step=op.shape[0] if dora_whole else max(1, BLOCK_BYTES // max(1, numel(rest) * 4)),
            fill=self._fill_row(source, key, src_rows, rest) if op.shape[0] > src_rows else None,
            tokens=self._token_rows(op),
            lora=self._lora_tensors(op),
            expert=self._expert_factors(op),
            start=self._requantized_start(op, source, key, src_rows, rest),
        )
        self.prepared = (op.out_key, prepared)
        return prepared

    def compute(self, op: TensorOp, prepared: "_Prepared", i: int, j: int, staged=None):
        """Rows [i, j) of ``op``'s result, in float32 on the engine's device (a reused buffer);
        ``staged``: the source rows already read (by the reader thread)."""
        import torch

        source, key = self.source_of(op)
        rest, src_rows = tuple(op.shape[1:]), prepared.src_rows
        work = self.work.take("work", (j - i,) + rest, torch.float32)
        k = min(j, src_rows)
        if i < k and prepared.start is not None:
            work[: k - i].copy_(prepared.start[i:k])
        elif i < k and staged is not None:
            work[: k - i].copy_(staged)
        elif i < k:
            staging = self.host_in.take("in", (k - i,) + rest, source.torch_dtype(key))
            source.read_rows(key, i, k, staging)
            work[: k - i].copy_(staging)
        if j > src_rows:
            work[max(i, src_rows) - i:].copy_(prepared.fill.expand(j - max(i, src_rows), *rest))
        for row, values in prepared.tokens:
            if i <= row < j:
                work[row - i].copy_(values)
        if prepared.lora is not None:
            self._apply_lora(work, op, prepared.lora, i, j)
        if prepared.expert is not None:
            left, right = prepared.expert
            if op.expert.expert is None:  # the whole stack: experts i..j, one batched GEMM
                work.baddbmm_(left[i:j], right[i:j], alpha=op.expert.scale)
            else:  # one expert's tensor (a slice of its rows in the stacked parameter)
                work.addmm_(left[i:j], right, alpha=op.expert.scale)
        if op.multiply != 1.0:
            work.mul_(op.multiply)
        return work

    def _fill_row(self, source, key, src_rows, rest):
        """The value of grown rows: the mean of the source rows (accumulated in float64), or zeros."""
        import torch

        if self.plan.options.new_rows == "zeros" or src_rows == 0:
            return torch.zeros((1,) + rest, dtype=torch.float32, device=self.device)
        total = torch.zeros(rest, dtype=torch.float64)
        step = max(1, BLOCK_BYTES // max(1, numel(rest) * 4))
        for i in range(0, src_rows, step):
            j = min(src_rows, i + step)
            staging = self.host_in.take("in", (j - i,) + rest, source.torch_dtype(key))
            source.read_rows(key, i, j, staging)
            total += staging.double().sum(dim=0)
        return (total / src_rows).float().to(self.device).unsqueeze(0)

    def _requantized_start(self, op: TensorOp, source, key: str, src_rows: int, rest: tuple):
        """The start as the 4-bit base of a QLoRA run held it, whole (NF4's double quantization ties
        every block of the tensor together), in float32; None unless --merge-base nf4 asks for it."""
        import torch

        if op.requantize != "nf4":
            return None
        from ..quantized import nf4_round_trip

        weight = torch.empty((src_rows,) + rest, dtype=source.torch_dtype(key))
        source.read_rows(key, 0, src_rows, weight)
        restored = nf4_round_trip(weight)
        difference = float((restored.float() - weight.float()).norm() / max(float(weight.float().norm()), 1e-12))
        self.stats["merge_base_modules"] = self.stats.get("merge_base_modules", 0) + 1
        self.stats["merge_base_max_rel_difference"] = max(self.stats.get("merge_base_max_rel_difference", 0.0), difference)
        return restored.to(device=self.device, dtype=torch.float32)

    def _token_rows(self, op: TensorOp) -> list[tuple[int, object]]:
        import torch

        if not op.token_rows_key:
            return []
        values = self.adapter.read(op.token_rows_key).to(device=self.device, dtype=torch.float32)
        return list(zip(op.token_indices, values, strict=True))

    def _lora_tensors(self, op: TensorOp):
        import torch

        if op.lora is None:
            return None
        def get(key):
            return self.adapter.read(key).to(device=self.device, dtype=torch.float32)
        a, b = get(op.lora.a_key), get(op.lora.b_key)
        magnitude = get(op.lora.magnitude_key) if op.lora.magnitude_key else None
        return a, b, magnitude

    def _expert_factors(self, op: TensorOp):
        """(left, right) with each expert's update = left_e @ right_e in the parameter's (d1, d2): for
        one expert's tensor, its rows of left_e and right_e; for the stack, all experts'."""
        import torch

        delta = op.expert
        if delta is None:
            return None
        a = self.adapter.read(delta.a_key).to(device=self.device, dtype=torch.float32)
        b = self.adapter.read(delta.b_key).to(device=self.device, dtype=torch.float32)
        experts = delta.experts
        a3 = a.reshape(experts, -1, a.shape[1])  # (E, r, a): PEFT stacks A expert-major
        b3 = b.reshape(b.shape[0], -1, experts).permute(2, 0, 1)  # (E, b, r): and B rank-major
        left, right = (b3, a3) if delta.b_first else (a3.transpose(1, 2), b3.transpose(1, 2))
        if delta.expert is None:
            return left.contiguous(), right.contiguous()
        rows = op.shape[0]
        return left[delta.expert, delta.row_offset:delta.row_offset + rows].contiguous(), right[delta.expert].contiguous()

    def _apply_lora(self, work, op: TensorOp, tensors, i: int, j: int) -> None:
        a, b, magnitude = tensors
        kind, scale = op.lora.kind, op.lora.scale
        if magnitude is not None:
            if kind == "linear":  # DoRA's norm is per output row, so row blocks are exact
                delta = linear_delta(a, b[i:j], scale)
                work.copy_(dora_weight(work, delta, magnitude[i:j]))
            else:  # Conv1D/embedding DoRA normalises whole columns: this op runs as a single block
                delta = embedding_delta(a, b, scale) if kind == "embedding" else linear_delta(a, b, scale, True)
                work.copy_(dora_weight(work, delta, magnitude, fan_in_fan_out=True))
            return
        # one fused in-place GEMM per block: no temporary the size of the weight
        if kind == "linear":  # W (out, in) += s · B (out, r) @ A (r, in)
            work.addmm_(b[i:j], a, alpha=scale)
        else:  # Conv1D W (in, out) and Embedding W (num, dim) += s · (B @ A)^T = s · A^T @ B^T
            work.addmm_(a[:, i:j].T, b.T, alpha=scale)


@dataclass
class _Prepared:
    src_rows: int
    step: int
    fill: object | None
    tokens: list
    lora: tuple | None
    expert: tuple | None = None
    start: object | None = None  # the whole start, when it is not read block by block (--merge-base nf4)


def is_plain(op: TensorOp, src_rows: int) -> bool:
    """The op copies its start unchanged (a cast aside)."""
    return not (op.lora or op.token_rows_key or op.expert or op.requantize) and op.multiply == 1.0 and op.shape[0] <= src_rows


class StageTensors:
    """An earlier stage's output tensors, computed on demand, row block by row block, by that
    stage's runner: the next stage reads them as it would read a base checkpoint's. Tensors the
    stage copies unchanged are read straight from where that stage reads them, in their own
    dtype; computed ones come as float32, so stages do not round between each other."""

    def __init__(self, runner: OpRunner):
        self.runner = runner
        self.ops = {op.out_key: op for op in runner.plan.ops}

    def _through(self, key: str):
        """(source, key) to delegate to when the stage copies ``key`` unchanged, else None."""
        op = self.ops[key]
        source, start = self.runner.source_of(op)
        if op.shape and is_plain(op, source.rows(start)) and op.shape[0] == source.rows(start):
            return source, start
        if not op.shape or not source.torch_dtype(start) or not source.torch_dtype(start).is_floating_point:
            return source, start
        return None

    def rows(self, key: str) -> int:
        shape = self.ops[key].shape
        return shape[0] if shape else 1

    def torch_dtype(self, key: str):
        import torch

        through = self._through(key)
        return through[0].torch_dtype(through[1]) if through else torch.float32

    def read_rows(self, key: str, start: int, stop: int, into) -> None:
        through = self._through(key)
        if through:
            through[0].read_rows(through[1], start, stop, into)
            return
        op = self.ops[key]
        into.copy_(self.runner.compute(op, self.runner.prepare(op), start, stop))

    def read(self, key: str):
        import torch

        through = self._through(key)
        if through:
            return through[0].read(through[1])
        out = torch.empty(self.ops[key].shape, dtype=torch.float32)
        self.read_rows(key, 0, self.rows(key), out)
        return out

    def close(self) -> None:
        pass


def execute_stream(plan: MergePlan, out_dir: Path, progress=None, stats: dict | None = None) -> list[str]:
    """Write the merged weights of ``plan`` into ``out_dir``; returns the file names written.
    ``stats`` collects what the report records of the run (the NF4 round trip's measured difference)."""
    blockers = stream_blockers(plan)
    if blockers:
        raise UnsupportedError(f"the stream engine cannot run this merge ({'; '.join(blockers)}); use --engine peft")
    device = pick_device(plan.options.device)
    layout = plan_shards(output_tensors(plan), parse_size(plan.options.max_shard_size))
    ops = {op.out_key: op for op in plan.ops}
    written = []
    with ExitStack() as stack, cpu_threads():
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="merger-write"))
        syncer = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="merger-fsync"))
        out = AsyncWriter(pool)
        reader = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="merger-read"))
        runner = stage_runners(plan, device, out, stack, reader)
        closing: list[Future] = []
        for shard_name, tensors in layout.files:
            writer = ShardWriter(out_dir / shard_name, tensors)
            for spec in tensors:
                run_op(runner, ops[spec.name], writer)
                if progress:
                    progress(1)
            out.drain()
            # fsync on its own thread: the next shard is merged and written while this one flushes
            closing.append(syncer.submit(writer.close))
            written.append(shard_name)
        for future in closing:
            future.result()
        if stats is not None:
            stats.update(runner.stats)
    write_index(out_dir, layout)
    return written


def stage_runners(plan: MergePlan, device: str, out: AsyncWriter, stack: ExitStack, reader: ThreadPoolExecutor | None = None) -> OpRunner:
    """The runner of the last stage; each stage reads the one before it (the first, the base)."""
    base = plan.first.base
    if base.quantized is not None:  # block-FP8 / MXFP4: the dequantized tensors, float32, block by block
        from .dequant_source import DequantizedFiles

        source = DequantizedFiles(base)
    else:
        source = TensorFiles(base.folder, base.tensors)
    stack.callback(source.close)
    runner = None
    for stage in plan.stages:
        adapter = open_adapter(stage)
        stack.callback(adapter.close)
        last = stage is plan
        runner = OpRunner(stage, device, source, adapter, out if last else None, reader if last else None)
        source = StageTensors(runner)
    return runner


def run_op(runner: OpRunner, op: TensorOp, writer: ShardWriter) -> None:
    """One output tensor (a seam for tests that break outputs on purpose)."""
    runner.run(op, writer)
