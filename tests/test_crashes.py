"""What a crash, a second run, a full disk or a double Ctrl-C leaves behind.

OUT is staged in ``.OUT.tmp-<hex>``, swapped into place only once proven, and guarded by the flock
``.OUT.lock`` for the whole run (merger/commit.py, merger/lock.py). These tests kill real merges
with SIGKILL at chosen points (the child slows or stalls one step, then signals the test through a
marker file), and check: OUT is as it was or complete, the inputs are byte-identical, and the next
run cleans up what the dead one left and records it in merge_report.json under "recovered".
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from merger import commit
from merger.api import validate_checkpoint
from merger.cli import main
from merger.lock import output_lock

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

# The real CLI (main() with no argv, as the console script runs it) in a child process. The JSON
# argument says what to slow or stall; "stall" points write a line to the marker file and then sleep,
# so the test knows exactly where the child is when it kills it.
CHILD = r"""
import json, os, sys, time
cfg = json.loads(sys.argv[1])

def mark(text):
    with open(cfg["marker"], "a") as handle:
        handle.write(text + "\n")

if cfg.get("write_delay"):
    from merger import shards
    write = shards.ShardWriter.write
    def slow_write(self, *args, **kwargs):
        time.sleep(cfg["write_delay"])
        return write(self, *args, **kwargs)
    shards.ShardWriter.write = slow_write

stall = cfg.get("stall")
if stall == "validate":  # the staging folder is complete, nothing is committed
    import merger.api as api
    validate = api.validate_output
    def stalled_validate(*args, **kwargs):
        mark("validate")
        time.sleep(120)
        return validate(*args, **kwargs)
    api.validate_output = stalled_validate
elif stall == "exchanged":  # renameat2 swapped OUT and staging, the old folder is not yet renamed .old
    from merger import commit
    exchange = commit.exchange
    def stalled_exchange(a, b):
        done = exchange(a, b)
        mark(f"exchanged {done}")
        time.sleep(120)
        return done
    commit.exchange = stalled_exchange
elif stall == "moved-aside":  # no exchange: OUT renamed to .old, staging not yet renamed to OUT
    from merger import commit
    commit.exchange = lambda a, b: False
    replace = os.replace
    def stalled_replace(src, dst):
        replace(src, dst)
        if ".old-" in os.path.basename(os.fspath(dst)):
            mark("moved-aside")
            time.sleep(120)
    os.replace = stalled_replace

if cfg.get("slow_cleanup"):  # removing the staging folder takes a while: a second signal lands in it
    import shutil
    rmtree = shutil.rmtree
    def slow_rmtree(path, *args, **kwargs):
        if ".tmp-" in os.path.basename(os.fspath(path)):
            mark("cleanup")
            time.sleep(cfg["slow_cleanup"])
        return rmtree(path, *args, **kwargs)
    shutil.rmtree = slow_rmtree

from merger.cli import main
sys.argv = ["merge-adapter"] + cfg["argv"]
sys.exit(main())
"""


def start_child(tmp_path: Path, argv: list[str], **cfg) -> tuple[subprocess.Popen, Path]:
    marker = tmp_path / f"marker-{len(list(tmp_path.glob('marker-*')))}.txt"
    config = {"argv": argv, "marker": str(marker), **cfg}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(config)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, marker


def wait_until(proc: subprocess.Popen, ready, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the child exited ({proc.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.communicate()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def sigkill(proc: subprocess.Popen) -> None:
    """Kill -9 a child that is provably still running; it gets no chance to clean anything up."""
    assert proc.poll() is None, "the child finished before the kill: the test would prove nothing"
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, err


def tree(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder``, by relative path (folders included, as empty strings)."""
    result = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        result[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
    return result


def beside(out: Path) -> list[str]:
    """What merger owns beside OUT: its lock, staging and replaced folders."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def merge_argv(base: Path, adapter: Path, out: Path, *extra: str) -> list[str]:
    return ["--base", str(base), "--adapter", str(adapter), "--out", str(out), "-q", *extra]


def make_previous(base: Path, adapter: Path, out: Path) -> dict[str, str]:
    """A real earlier merge in OUT (other shard size, plus a file of ours), to tell it from a new one."""
    assert main(merge_argv(base, adapter, out, "--max-shard-size", "20KB")) == 0
    (out / "previous.txt").write_text("an earlier merge")
    assert beside(out) == []
    return tree(out)


def removal_line(name: str) -> str:
    return rf"removed {re.escape(name)} \([0-9.]+ [KMG]?B\), left beside out by a run that was killed"


def assert_valid(out: Path, base: Path, adapter: Path) -> None:
    report = validate_checkpoint(out, base, adapter)
    assert report.ok, report.summary()


# --------------------------------------------------------------------------------------------------
# 1. kill -9 at several points, then a normal second run
# --------------------------------------------------------------------------------------------------

KILL_POINTS = {
    # name: (OUT existed before, what the child does, what the test waits for, extra random delay)
    "staging-created": (False, {"write_delay": 0.15}, "staging", 0.3),
    "shards-written": (True, {"write_delay": 0.15}, "shard", 0.6),
    "validation": (False, {"stall": "validate"}, "marker", 0.1),
    "after-exchange": (True, {"stall": "exchanged"}, "marker", 0.1),
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_leaves_out_whole_and_the_next_run_cleans_up(copies, tmp_path, point):
    base, adapter = copies
    inputs = {"base": tree(base), "adapter": tree(adapter)}
    out = tmp_path / "out"
    existed, child_cfg, wait_for, max_delay = KILL_POINTS[point]
    previous = make_previous(base, adapter, out) if existed else None
    extra = ["--overwrite"] if existed else []
    proc, marker = start_child(tmp_path, merge_argv(base, adapter, out, *extra, "--max-shard-size", "5KB"), **child_cfg)

    ready = {
        "staging": lambda: any(p.is_dir() for p in tmp_path.glob(".out.tmp-*")),
        "shard": lambda: bool(list(tmp_path.glob(".out.tmp-*/*.safetensors"))),
        "marker": lambda: marker.exists() and marker.read_text().endswith("\n"),
    }[wait_for]
    wait_until(proc, ready, point)
    time.sleep(random.Random(f"kill-{point}").uniform(0, max_delay))
    sigkill(proc)

    # what the dead run left: its stale lock file and exactly one staging folder, nothing else
    left = beside(out)
    staging = [name for name in left if name.startswith(".out.tmp-")]
    assert len(staging) == 1 and sorted(left) == sorted([".out.lock"] + staging), left
    staged = tmp_path / staging[0]
    assert {"base": tree(base), "adapter": tree(adapter)} == inputs
    if point == "after-exchange":
        done = marker.read_text().split()
        if done != ["exchanged", "True"]:
            pytest.skip(f"renameat2(RENAME_EXCHANGE) is not supported on {tmp_path}'s file system")
        assert_valid(out, base, adapter)  # the new checkpoint is in place, complete
        assert not (out / "previous.txt").exists()
        assert tree(staged) == previous  # the staging name now holds the old OUT, whole
    elif existed:
        assert tree(out) == previous
    else:
        assert not out.exists()
    if point == "validation":  # a complete, unproven checkpoint: still not committed
        assert (staged / "config.json").is_file() and (staged / "model.safetensors.index.json").is_file()

    assert main(merge_argv(base, adapter, out, *extra)) == 0
    assert beside(out) == []
    assert_valid(out, base, adapter)
    assert not (out / "previous.txt").exists()
    report = json.loads((out / "merge_report.json").read_text())
    assert len(report["recovered"]) == 1 and re.fullmatch(removal_line(staging[0]), report["recovered"][0]), report["recovered"]
    assert report["options"]["max_shard_size"] != "20KB"
    assert {"base": tree(base), "adapter": tree(adapter)} == inputs


# --------------------------------------------------------------------------------------------------
# 2. a kill between the two renames of the non-exchange commit, and exchange itself
# --------------------------------------------------------------------------------------------------


def test_replaced_out_left_aside_is_restored_before_anything_else(copies, tmp_path, capsys, caplog):
    """OUT missing, a previous checkpoint at .OUT.old-*: what a kill between the two renames leaves."""
    base, adapter = copies
    out = tmp_path / "out"
    previous = make_previous(base, adapter, out)
    os.replace(out, tmp_path / ".out.old-abcdef12")
    older = tmp_path / ".out.old-00000000"  # an older leftover: removed, not restored
    older.mkdir()
    (older / "junk.bin").write_bytes(b"\0" * 100)
    os.utime(older, (time.time() - 3600, time.time() - 3600))
    staging = tmp_path / ".out.tmp-12345678"
    staging.mkdir()
    (staging / "model-00001-of-00003.safetensors").write_bytes(b"\0" * 64)
    unrelated = tmp_path / ".out.tmp-notours"  # not a name merger makes: left alone
    unrelated.mkdir()
    capsys.readouterr()

    with caplog.at_level(logging.WARNING, logger="merger.commit"):
        code = main(merge_argv(base, adapter, out))
    assert code == 2
    assert "exists and is not empty; pass --overwrite" in one_line(capsys.readouterr().err)
    assert tree(out) == previous
    assert beside(out) == [".out.tmp-notours"]
    messages = [r.getMessage() for r in caplog.records if r.name == "merger.commit"]
    assert messages[0] == f"{out}: restored the previous checkpoint from .out.old-abcdef12, left there by a run killed while replacing it"
    assert sorted(re.sub(r"\(.*\)", "(SIZE)", m) for m in messages[1:]) == [
        "removed .out.old-00000000 (SIZE), left beside out by a run that was killed",
        "removed .out.tmp-12345678 (SIZE), left beside out by a run that was killed"]
    assert_valid(out, base, adapter)

    assert main(merge_argv(base, adapter, out, "--overwrite")) == 0
    assert beside(out) == [".out.tmp-notours"]
    assert not (out / "previous.txt").exists()
    report = json.loads((out / "merge_report.json").read_text())
    assert report["recovered"] == [] and report["options"]["max_shard_size"] != "20KB"
    assert_valid(out, base, adapter)


@pytest.mark.slow
def test_sigkill_between_the_two_renames_then_recovery(copies, tmp_path, capsys):
    """The same state made by a real kill: exchange unavailable, OUT moved aside, staging not yet in place."""
    base, adapter = copies
    inputs = tree(base), tree(adapter)
    out = tmp_path / "out"
    previous = make_previous(base, adapter, out)
    proc, marker = start_child(tmp_path, merge_argv(base, adapter, out, "--overwrite"), stall="moved-aside")
    wait_until(proc, lambda: marker.exists() and marker.read_text() == "moved-aside\n", "the first rename")
    sigkill(proc)

    assert not out.exists()
    left = beside(out)
    assert len(left) == 3 and left[0] == ".out.lock", left
    old, staged = tmp_path / left[1], tmp_path / left[2]
    assert re.fullmatch(r"\.out\.old-[0-9a-f]{8}", old.name) and re.fullmatch(r"\.out\.tmp-[0-9a-f]{8}", staged.name)
    assert tree(old) == previous
    assert_valid(staged, base, adapter)  # the new checkpoint was complete, only not yet renamed
    capsys.readouterr()

    assert main(merge_argv(base, adapter, out)) == 2  # the old OUT comes back first, so it is not empty
    assert "exists and is not empty" in one_line(capsys.readouterr().err)
    assert tree(out) == previous and beside(out) == []

    assert main(merge_argv(base, adapter, out, "--overwrite")) == 0
    assert beside(out) == [] and not (out / "previous.txt").exists()
    assert_valid(out, base, adapter)
    assert (tree(base), tree(adapter)) == inputs


def test_exchange_swaps_two_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x.txt").write_text("A")
    (b / "y").mkdir()
    (b / "y" / "z.txt").write_text("B")
    if not commit.exchange(a, b):
        pytest.skip(f"renameat2(RENAME_EXCHANGE) is not supported on {tmp_path}'s file system (or not Linux)")
    assert tree(a) == {"y": "", "y/z.txt": hashlib.sha256(b"B").hexdigest()}
    assert tree(b) == {"x.txt": hashlib.sha256(b"A").hexdigest()}
    assert commit.exchange(a, b) is True  # and back
    assert (a / "x.txt").read_text() == "A" and (b / "y" / "z.txt").read_text() == "B"
    with pytest.raises(FileNotFoundError) as caught:
        commit.exchange(a, tmp_path / "missing")
    assert caught.value.errno == errno.ENOENT and caught.value.filename == str(tmp_path / "missing")
    assert (a / "x.txt").read_text() == "A"


# --------------------------------------------------------------------------------------------------
# 3. two merges into one OUT
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_concurrent_merges_one_wins(copies, tmp_path):
    base, adapter = copies
    out = tmp_path / "out"
    sizes = ["5KB", "10KB"]  # recorded in merge_report.json: tells the winner's report from the loser's
    procs = [start_child(tmp_path, merge_argv(base, adapter, out, "--max-shard-size", size), write_delay=0.1)[0]
             for size in sizes]
    results = [proc.communicate(timeout=180) for proc in procs]
    codes = [proc.returncode for proc in procs]
    assert sorted(codes) == [0, 2], results
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    line = one_line(results[loser][1])
    if "another merge is writing it" in line:
        assert f"(pid {procs[winner].pid} on " in line or "(a run that has not yet said who it is)" in line, line
        assert f"the lock is {tmp_path / '.out.lock'}" in line
    else:  # it started only after the winner had finished
        assert "exists and is not empty" in line, line
    assert_valid(out, base, adapter)
    report = json.loads((out / "merge_report.json").read_text())
    assert report["options"]["max_shard_size"] == sizes[winner] and report["recovered"] == []
    assert beside(out) == []


@pytest.mark.slow
def test_a_held_lock_refuses_the_run_and_names_its_holder(demo_pair, tmp_path):
    base, adapter = demo_pair
    out = tmp_path / "out"
    with output_lock(out) as lock:
        assert lock == tmp_path / ".out.lock"
        proc = subprocess.run([sys.executable, "-m", "merger", *merge_argv(base, adapter, out)], env=ENV,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        line = one_line(proc.stderr)
        assert line.startswith(f"error: --out {out}: another merge is writing it (pid {os.getpid()} on "), line
        assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock"]  # nothing written, no staging
        assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# 4. the disk fills up
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path, demo_pair):
    """A tmpfs with room for the estimated weights and a few pages more: the merge passes the free
    space check, then runs out (page rounding, config, tokenizer files)."""
    from merger.api import inspect_adapter
    from merger.preflight import output_bytes

    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        pytest.skip("needs Linux mount")
    needed = output_bytes(inspect_adapter(*demo_pair))
    page = os.sysconf("SC_PAGE_SIZE")
    size = (needed // page + 3) * page
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        assert shutil.disk_usage(mnt).free >= needed
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_on_a_real_small_file_system(demo_pair, small_tmpfs, capsys):
    base, adapter = demo_pair
    inputs = tree(base), tree(adapter)
    out = small_tmpfs / "out"
    code = main(merge_argv(base, adapter, out))
    line = one_line(capsys.readouterr().err)
    assert code == 2, line
    assert line.startswith(f"error: --out {out}: the disk filled up while writing "), line
    assert line.endswith("nothing was committed and the partial files were removed: free space or choose another disk")
    assert list(small_tmpfs.iterdir()) == []  # no OUT, no staging, no lock
    assert (tree(base), tree(adapter)) == inputs


def test_disk_full_mid_write_is_one_line_and_leaves_nothing(copies, tmp_path, capsys, monkeypatch):
    from merger import shards

    base, adapter = copies
    out = tmp_path / "out"
    write = shards.ShardWriter.write
    calls = []

    def full(self, name, block):
        calls.append(self.path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return write(self, name, block)

    monkeypatch.setattr(shards.ShardWriter, "write", full)
    code = main(merge_argv(base, adapter, out, "--max-shard-size", "5KB"))
    line = one_line(capsys.readouterr().err)
    assert code == 2 and len(calls) == 3
    staged = calls[-1]
    assert re.fullmatch(r"\.out\.tmp-[0-9a-f]{8}", staged.parent.name) and staged.parent.parent == tmp_path
    assert line == (f"error: --out {out}: the disk filled up while writing {staged}; nothing was committed and the "
                    "partial files were removed: free space or choose another disk")
    assert not out.exists() and beside(out) == []


# --------------------------------------------------------------------------------------------------
# 5. Ctrl-C twice
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("second", ["after-50ms", "during-cleanup"])
def test_double_ctrl_c_is_one_clean_interrupt(copies, tmp_path, second):
    """A second Ctrl-C, 50 ms after the first or while the staging folder is being removed, changes nothing."""
    base, adapter = copies
    out = tmp_path / "out"
    previous = make_previous(base, adapter, out)
    proc, marker = start_child(tmp_path, merge_argv(base, adapter, out, "--overwrite", "--max-shard-size", "5KB"),
                               write_delay=0.2, slow_cleanup=0.5 if second == "during-cleanup" else 0)
    wait_until(proc, lambda: bool(list(tmp_path.glob(".out.tmp-*/*.safetensors"))), "the first shard")
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    if second == "during-cleanup":
        wait_until(proc, lambda: marker.exists() and marker.read_text() == "cleanup\n", "the staging folder's removal")
    else:
        time.sleep(0.05)
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert one_line(err).startswith("error: interrupted; OUT is as it was"), err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert beside(out) == []
    assert tree(out) == previous
