"""torchrun: 2 CPU processes (gloo) train like 1 process with the same global batch, and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from nin.checkpoint import LAST, read_tensors
from tests.test_resume import run_metrics, saved_step

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(*args: str, processes: int = 2) -> subprocess.Popen:
    """`torchrun --standalone --nproc-per-node N -m nin ARGS` as a subprocess."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc-per-node={processes}", "-m", "nin", *args]
    return subprocess.Popen(
        command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )  # fmt: skip


def succeed(process: subprocess.Popen) -> str:
    """Wait for a process; its output, asserting it succeeded."""
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out
    return out


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (torchrun starts its workers in their own sessions)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it ended meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def final_metrics(run_dir: Path) -> dict:
    """The last line of a run's metrics.jsonl."""
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def args(data_dir: Path, out: Path) -> list[str]:
    """A short real run: 2,048 images, 3 epochs, global batch 128, float32."""
    return [
        "train", "--data-dir", str(data_dir), "--train-subset", "2048", "--test-subset", "512",
        "--epochs", "3", "--batch-size", "128", "--no-amp", "--seed", "1", "--out", str(out),
    ]  # fmt: skip


def test_two_processes_match_one_process_with_the_same_global_batch(data_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # Batch norm (statistics over each process's 64 images), dropout and random flips (each
    # process its own masks) are the only things that may differ by design; with them off, the
    # two runs see the same examples in every step and take the same steps, up to float
    # summation order.
    kwargs = '{"batch_norm": false, "dropout": 0, "num_pointwise": 0}'  # learns without BN
    same = ["--model-kwargs", kwargs, "--lr", "0.05", "--schedule", "constant", "--no-flip"]
    single = [sys.executable, "-m", "nin", *args(data_dir, one), *same]
    subprocess.run(single, env=ENV, check=True, capture_output=True)
    out = succeed(torchrun(*args(data_dir, two), *same))
    assert "2 processes, global batch 128" in out
    assert out.count("epoch 3/3:") == 1  # rank 0 alone logs
    a, b = final_metrics(one), final_metrics(two)
    # Both learn: 3 epochs of 2,048 images reach about 0.7 here; chance is 0.1.
    assert a["loss"] < 2.0 and a["test_acc"] > 0.5 and a["train_acc"] > 0.5, a
    # Tolerance: 1e-3 relative in the loss, and at most 1% of images changing their prediction.
    assert abs(a["loss"] - b["loss"]) <= 1e-3 * a["loss"], (a, b)
    assert abs(a["train_acc"] - b["train_acc"]) <= 0.01, (a, b)
    assert abs(a["test_acc"] - b["test_acc"]) <= 0.01, (a, b)
    assert json.loads((two / "config.json").read_text())["world_size"] == 2


def test_two_processes_resume_exactly_after_a_kill(data_dir, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    extra = ["--checkpoint-every", "4", "--deterministic"]
    succeed(torchrun(*args(data_dir, straight), *extra))
    victim = torchrun(*args(data_dir, killed), *extra)
    deadline = time.monotonic() + 300
    while (position := saved_step(killed / LAST)) is None or position[1] == 0:
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    workers = children(victim.pid)
    assert len(workers) == 2
    for pid in (*workers, victim.pid):  # both workers, then torchrun
        os.kill(pid, signal.SIGKILL)
    victim.communicate()
    out = succeed(torchrun("train", "--resume", str(killed), "--data-dir", str(data_dir)))
    assert "resuming" in out
    a, _ = read_tensors(straight / "model.safetensors")
    b, _ = read_tensors(killed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Each process's partial sums come back to it: the log matches to the last digit.
    assert run_metrics(killed) == run_metrics(straight)
    # And the numbers are those of a run that learned, counted over both processes' images (rank
    # 0's count alone, over all 2,048, would halve the accuracy): about 0.66 here, chance 0.1.
    rows = run_metrics(straight)
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    losses = [row["loss"] for row in rows]
    assert losses == sorted(losses, reverse=True) and losses[-1] < 1.5, rows
    assert rows[-1]["train_acc"] > 0.5 and rows[-1]["test_acc"] > 0.5, rows
    done = json.loads((straight / "config.json").read_text())["result"]
    plain = done.get("test_acc_no_tta", done["test_acc"])  # the rows have no test-time flips
    assert plain == rows[-1]["test_acc"] and done["train_acc"] == rows[-1]["train_acc"]
    # Resuming with another number of processes is refused: each has its own random state.
    (killed / "model.safetensors").unlink()
    single = [sys.executable, "-m", "nin", "train", "--resume", str(killed)]
    done = subprocess.run(single, env=ENV, capture_output=True, text=True)
    assert done.returncode == 1
