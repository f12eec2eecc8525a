"""Never lose a run: a SIGKILLed `nin train` resumes to the very same weights, bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from nin.checkpoint import LAST, load_checkpoint, read_tensors


def nin(*args: str, **kwargs) -> subprocess.Popen:
    """`python -m nin ARGS` as a subprocess, single-threaded so timing cannot change results."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "nin", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def finish(process: subprocess.Popen) -> str:
    """Wait for a `nin` subprocess; its output, asserting it succeeded."""
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out
    return out


def saved_step(path: Path) -> tuple[int, int] | None:
    """(epoch, step) of a training-state file, or None while there is none."""
    try:
        with safe_open(str(path), framework="pt") as f:
            state = json.loads(f.metadata()["state"])
    except Exception:  # not written yet
        return None
    return state["run"]["epoch"], state["run"]["step"]


def run_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the timing columns, which differ between any two runs."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timing = ("examples_per_sec", "epoch_seconds", "eval_seconds", "elapsed_seconds")
    return [{k: v for k, v in row.items() if k not in timing} for row in rows]


# The default preset with flips and crops, whose random generator is part of the state (on
# Fashion-MNIST, so it runs wherever the test data is), and the CIFAR-10 recipe whose lookahead
# average is part of the state: its first mid-epoch checkpoint (step 6) comes after the first
# pull towards the average (step 5).
RUNS = {
    "compact-augmented": [
        "--train-subset", "1536", "--checkpoint-every", "4", "--flip", "--crop-padding", "2",
    ],
    "cifar10-fast": [
        "--preset", "cifar10-fast", "--train-subset", "768", "--tta", "1",
        "--checkpoint-every", "6", "--lookahead", "5",
    ],
}  # fmt: skip


@pytest.mark.parametrize("preset", RUNS)
def test_sigkill_mid_epoch_then_resume_gives_the_same_weights_bit_for_bit(
    data_dir, tmp_path, preset
):
    if preset == "cifar10-fast" and not (data_dir / "cifar-10").is_dir():
        pytest.skip("real CIFAR-10 not found")
    common = [
        "train", "--data-dir", str(data_dir), *RUNS[preset], "--test-subset", "256",
        "--epochs", "2", "--batch-size", "64", "--deterministic",
        "--seed", "3",
    ]  # fmt: skip
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    finish(nin(*common, "--out", str(straight)))

    victim = nin(*common, "--out", str(killed))
    deadline = time.monotonic() + 300
    # Kill it as soon as a mid-epoch checkpoint exists (24 or 12 steps per epoch).
    while (position := saved_step(killed / LAST)) is None or position[1] == 0:
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    resumed_at = saved_step(killed / LAST)
    assert resumed_at is not None and resumed_at[1] > 0, "the kill should land mid-epoch"
    lines_before = len((killed / "metrics.jsonl").read_text().splitlines())
    assert lines_before == resumed_at[0] - 1 or lines_before == resumed_at[0]

    out = finish(nin("train", "--resume", str(killed), "--data-dir", str(data_dir)))
    assert f"resuming {killed} at epoch {resumed_at[0]}, step {resumed_at[1]}" in out

    a, _ = read_tensors(straight / "model.safetensors")
    b, _ = read_tensors(killed / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # The log: every epoch once, with the very same numbers.
    assert run_metrics(killed) == run_metrics(straight)
    assert len(run_metrics(killed)) == 2


def test_resume_refuses_changed_settings_and_finished_runs(data_dir, tmp_path):
    from nin.cli import main

    out = tmp_path / "run"
    common = ["--data-dir", str(data_dir), "--train-subset", "256", "--test-subset", "64"]
    assert main(["train", *common, "--epochs", "1", "--batch-size", "64", "--out", str(out)]) == 0
    assert main(["train", "--resume", str(out), "--lr", "0.5"]) == 1
    assert main(["train", "--resume", str(out), "--data-dir", str(data_dir)]) == 1  # finished
    assert main(["train", *common, "--out", str(out)]) == 1  # would overwrite a run
    model, config = load_checkpoint(out / LAST)  # a training-state file loads as a model too
    assert config["model"] == "nin_compact"
    assert isinstance(model, torch.nn.Module)


def test_best_checkpoint_is_picked_on_validation_never_on_test(data_dir, tmp_path):
    from nin.cli import main

    out = tmp_path / "run"
    args = ["--data-dir", str(data_dir), "--train-subset", "512", "--test-subset", "128"]
    argv = ["train", *args, "--epochs", "2", "--batch-size", "64", "--out", str(out)]
    assert main([*argv, "--holdout", "128"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    best = max(rows, key=lambda r: r["val_acc"])
    _, metadata = read_tensors(out / "best.safetensors")
    assert int(metadata["epoch"]) == best["epoch"]
    assert pytest.approx(float(metadata["val_acc"])) == best["val_acc"]
    # Without a validation split the epochs are scored on test: no weights are picked by it.
    assert main([*argv[:-1], str(tmp_path / "plain")]) == 0
    assert not (tmp_path / "plain" / "best.safetensors").exists()


def test_a_run_killed_before_its_final_files_gets_them_on_resume(data_dir, tmp_path):
    from nin.cli import main

    out = tmp_path / "run"
    args = ["--data-dir", str(data_dir), "--train-subset", "256", "--test-subset", "64"]
    assert main(["train", *args, "--epochs", "1", "--batch-size", "64", "--out", str(out)]) == 0
    final = read_tensors(out / "model.safetensors")[0]
    (out / "model.safetensors").unlink()  # as if killed between the last checkpoint and it
    assert main(["train", "--resume", str(out)]) == 0
    again = read_tensors(out / "model.safetensors")[0]
    assert all(torch.equal(final[k], again[k]) for k in final)
    assert len(run_metrics(out)) == 1


def test_a_safetensors_header_that_starts_like_a_pickle_still_loads(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    for pad in range(64):  # some header length ends in the byte 0x80, pickle's first byte
        save_file({"w": torch.ones(2)}, str(path), metadata={"m": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    tensors, _ = read_tensors(path)
    assert torch.equal(tensors["w"], torch.ones(2))
