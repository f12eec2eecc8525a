"""Every CUDA path through a few steps, checked: `pytest -m cuda` (`make gpu-check` runs it).

Skipped where torch sees no CUDA device, so the suite runs anywhere. Covered: device placement,
bfloat16 autocast against float32, float16 autocast with loss scaling (forced on any GPU), the
fused SGD kernel, torch.compile, NCCL (a one-process world on one GPU; torchrun across two GPUs
where there are two), a SIGKILLed run resuming bit for bit with --deterministic, peak memory in
`nin resources`, and predict, export and serve with a model on the GPU.
"""

from __future__ import annotations

import copy
import io
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import nin.device as nin_device  # `nin` itself is test_resume's CLI runner, imported below
import nin.train as nin_train
from nin.checkpoint import LAST, read_tensors
from nin.cli import main
from nin.config import make_config, read_config
from nin.data import dataset_spec, load_split
from nin.device import amp_dtype, autocast
from nin.distributed import World
from nin.export import export_model
from nin.models import create_model
from nin.predict import Predictor
from nin.pretrained import load_pretrained
from nin.resources import measure_resources
from nin.train import train
from tests.conftest import SHARED_DATA
from tests.test_resume import finish, nin, run_metrics, saved_step

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]
CUDA = torch.device("cuda")


def short_run(data_dir: Path, out: Path, **overrides) -> dict:
    """The compact preset on 8,192 Fashion-MNIST images for 2 epochs, device left to nin."""
    settings = dict(
        data_dir=str(data_dir), out=str(out), train_subset=8192, test_subset=2048, epochs=2
    )
    return train(make_config("compact", **{**settings, **overrides}), log=lambda line: None)


def assert_learned(result: dict) -> None:
    """Finite losses that fall, and a test accuracy far above chance (2 CPU epochs: 0.80)."""
    losses = [row["loss"] for row in result["history"]]
    assert all(math.isfinite(loss) for loss in losses), losses
    assert losses[-1] < losses[0], losses
    assert result["test_acc"] > 0.6, result["test_acc"]


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory) -> dict:
    """One short run of the compact preset (bf16 autocast, channels-last), shared by the tests
    that only read it."""
    if not (SHARED_DATA / "fashion-mnist").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set NIN_TEST_DATA)")
    return short_run(SHARED_DATA, tmp_path_factory.mktemp("cuda") / "run")


def test_training_goes_to_the_gpu_and_learns(gpu_run):
    assert gpu_run["device"].startswith("cuda")
    assert all(p.is_cuda for p in gpu_run["model"].parameters())
    saved = read_config(Path(gpu_run["run_dir"]))
    assert saved["environment"]["gpu"] == torch.cuda.get_device_name()
    assert saved["amp"] and saved["channels_last"]
    assert_learned(gpu_run)


def test_the_chapters_preset_runs_with_the_fast_path(data_dir, tmp_path):
    """nin_d2l resized to 224×224 on the GPU, bf16, channels-last, one fused SGD kernel."""
    config = make_config(
        "d2l", data_dir=str(data_dir), out=str(tmp_path / "run"), train_subset=1024,
        test_subset=256, epochs=1, amp=True, channels_last=True, fused=True,
    )  # fmt: skip
    result = train(config, log=lambda line: None)
    assert result["device"].startswith("cuda")
    assert math.isfinite(result["loss"]) and result["examples_per_sec"] > 0


def test_bfloat16_autocast_agrees_with_float32(gpu_run, data_dir, tmp_path):
    # bfloat16 on every GPU that has it natively (float16 on older ones: the next test).
    dtype = amp_dtype(CUDA)
    assert dtype in (torch.bfloat16, torch.float16)
    model, config = load_pretrained("fashion-mnist")
    predictor = Predictor(model, config, "cuda")
    images, _ = load_split("fashion-mnist", "test", data_dir)
    x = predictor.preprocess(images[:1024].to(CUDA))
    with torch.no_grad():
        full = predictor.model(x).float()
        with autocast(CUDA, True):
            half = predictor.model(x)
    assert half.dtype == dtype
    assert (half.float() - full).abs().max() <= 0.05 * full.abs().max()
    assert (half.argmax(1) == full.argmax(1)).float().mean() >= 0.98
    # The same short run in float32 ends close to the bf16 one (gpu_run).
    fp32 = short_run(data_dir, tmp_path / "fp32", amp=False)
    assert_learned(fp32)
    assert abs(gpu_run["loss"] - fp32["loss"]) <= 0.1 * fp32["loss"], (gpu_run["loss"], fp32)
    assert abs(gpu_run["test_acc"] - fp32["test_acc"]) <= 0.04


@pytest.mark.parametrize("fused", [False, True])
def test_float16_autocast_scales_the_loss(data_dir, tmp_path, monkeypatch, fused):
    """GPUs without native bfloat16 (V100, T4) get float16 and a GradScaler: forced here."""
    monkeypatch.setattr(nin_device, "amp_dtype", lambda device: torch.float16)
    result = short_run(data_dir, tmp_path / "run", amp=True, fused=fused)
    assert_learned(result)
    _, metadata = read_tensors(Path(result["run_dir"]) / LAST)
    scaler = json.loads(metadata["state"])["scaler"]
    assert scaler and scaler["scale"] > 0  # the scaler was on, and its state is checkpointed


def test_fused_sgd_takes_the_same_steps_as_the_plain_loop():
    torch.manual_seed(0)
    params = [torch.randn(64, 32, 3, 3, device=CUDA), torch.randn(64, device=CUDA)]
    grads = [[torch.randn_like(p) for p in params] for _ in range(3)]
    final = []
    for kwargs in ({"foreach": False}, {"fused": True}):
        copies = [p.clone().requires_grad_() for p in params]
        optimizer = torch.optim.SGD(
            copies, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, **kwargs
        )
        for step in grads:
            for p, g in zip(copies, step, strict=True):
                p.grad = g.clone()
            optimizer.step()
        final.append([p.detach() for p in copies])
    for plain, fused in zip(*final, strict=True):
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)


def test_a_compiled_model_trains(data_dir, tmp_path):
    result = short_run(data_dir, tmp_path / "run", compile=True)
    assert_learned(result)


@pytest.mark.parametrize("preset", ["compact", "cifar10-fast"])
def test_a_run_killed_on_the_gpu_resumes_bit_for_bit(data_dir, tmp_path, monkeypatch, preset):
    """--deterministic on CUDA: SIGKILL mid-epoch, resume: the same weights and log as a run
    that was never stopped.

    cifar10-fast runs on Fashion-MNIST here (it needs no CIFAR-10 to take its paths: whitening,
    lookahead, test-time augmentation). Its whitening is a matrix product, and under
    deterministic algorithms cuBLAS refuses to run unless CUBLAS_WORKSPACE_CONFIG is set before
    its first call: `nin train --deterministic` has to see to that itself, so nothing is set here.
    """
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    common = [
        "train", "--preset", preset, "--dataset", "fashion-mnist", "--data-dir", str(data_dir),
        "--train-subset", "25600", "--test-subset", "1024", "--epochs", "2", "--batch-size",
        "64", "--checkpoint-every", "50", "--deterministic", "--seed", "3", "--device", "cuda",
    ]  # fmt: skip
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    straight = nin(*common, "--out", str(straight_dir))  # the two share the GPU meanwhile
    victim = nin(*common, "--out", str(killed_dir))
    deadline = time.monotonic() + 300
    # 400 steps an epoch, a checkpoint every 50: kill at the first one inside an epoch.
    while (position := saved_step(killed_dir / LAST)) is None or position[1] == 0:
        if victim.poll() is not None:
            pytest.fail(f"the run ended before it could be killed:\n{victim.communicate()[0]}")
        assert time.monotonic() < deadline
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    finish(straight)
    resumed_at = saved_step(killed_dir / LAST)
    assert resumed_at is not None and resumed_at[1] > 0, "the kill should land mid-epoch"
    out = finish(nin("train", "--resume", str(killed_dir), "--data-dir", str(data_dir)))
    assert f"resuming {killed_dir} at epoch {resumed_at[0]}, step {resumed_at[1]}" in out
    a, _ = read_tensors(straight_dir / "model.safetensors")
    b, _ = read_tensors(killed_dir / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert run_metrics(killed_dir) == run_metrics(straight_dir)


def test_peak_memory_is_read_from_the_gpu(capsys):
    model = create_model("nin_compact").to(CUDA)
    report = measure_resources(model, "nin_compact", (1, 28, 28), 128)
    assert report.device.startswith("cuda") and report.measured is not None
    measured = report.measured
    # The peak (torch.cuda.max_memory_allocated) holds at least what a step keeps alive.
    assert measured.training_peak >= measured.weights + measured.saved_activations
    assert measured.inference_peak < measured.training_peak
    assert measured.training_peak < 4 * report.analytic.training_peak
    assert main(["resources", "nin_compact", "--device", "cuda", "--batch-size", "128"]) == 0
    out = capsys.readouterr().out
    assert "on cuda" in out and "not measured" not in out


def test_predictions_on_the_gpu_match_the_cpu(data_dir):
    model, config = load_pretrained("fashion-mnist")
    cpu = Predictor(copy.deepcopy(model), config, "cpu")
    gpu = Predictor(model, config, "cuda")
    assert all(p.is_cuda for p in gpu.model.parameters())
    images, _ = load_split("fashion-mnist", "test", data_dir)
    on_cpu, on_gpu = cpu.probabilities(images[:256]), gpu.probabilities(images[:256])
    assert on_gpu.device.type == "cpu"
    # TF32 convolutions (PyTorch's default on GPUs) move probabilities by far less than this.
    torch.testing.assert_close(on_gpu, on_cpu, atol=1e-2, rtol=0)
    assert (on_gpu.argmax(1) == on_cpu.argmax(1)).float().mean() >= 0.99
    # One image the way `nin predict` and `nin serve` take it: a Pillow image in, top 5 out.
    image = Image.fromarray(images[0, 0].numpy())
    assert gpu.predict(image).top[0][0] == cpu.predict(image).top[0][0]


def test_a_gpu_trained_checkpoint_and_a_gpu_model_export(gpu_run, tmp_path, capsys):
    run_dir = gpu_run["run_dir"]
    out = tmp_path / "model.pt2"
    assert main(["export", run_dir, "--format", "torch-export", "--out", str(out)]) == 0
    assert "max abs difference from PyTorch" in capsys.readouterr().out
    # A model still on the GPU (channels-last, as trained): the export takes it to the CPU.
    model = copy.deepcopy(gpu_run["model"])
    result = export_model(model, read_config(Path(run_dir)), tmp_path / "again.pt2", "torch-export")
    assert max(result.differences.values()) < 1e-3


def test_the_demo_page_classifies_with_a_gpu_model(data_dir):
    for package in ("fastapi", "uvicorn", "python_multipart", "httpx"):
        pytest.importorskip(package)
    from fastapi.testclient import TestClient

    from nin.serve import create_app

    model, config = load_pretrained("fashion-mnist")
    app = create_app(Predictor(model, config, "cuda"), "fashion-mnist")
    images, labels = load_split("fashion-mnist", "test", data_dir)
    png = io.BytesIO()
    Image.fromarray(images[0, 0].numpy()).save(png, format="PNG")
    files = {"file": ("test-0.png", png.getvalue(), "image/png")}
    reply = TestClient(app).post("/predict", files=files)
    assert reply.status_code == 200, reply.text
    expected = dataset_spec("fashion-mnist").classes[int(labels[0])]
    assert reply.json()["top"][0]["class"] == expected


class OneProcessWorld(World):
    """A world of one process that still takes the multi-process path (DDP, collectives)."""

    @property
    def active(self) -> bool:
        """Always: so every collective goes through NCCL."""
        return True


def test_the_nccl_path_in_a_world_of_one(data_dir, tmp_path, monkeypatch):
    """torchrun's path on one GPU: NCCL, DDP, the collectives of checkpoints and metrics.

    NCCL refuses two processes on one GPU; the next test takes a world of two where there are
    two GPUs.
    """
    dist = torch.distributed
    if not dist.is_nccl_available():
        pytest.skip("this build of torch has no NCCL")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        monkeypatch.setattr(nin_train, "init_world", lambda device=None: OneProcessWorld())
        result = short_run(data_dir, tmp_path / "run")
        assert not dist.is_initialized(), "training ends by leaving the process group"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert_learned(result)
    assert read_config(Path(result["run_dir"]))["world_size"] == 1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (one process each)")
def test_torchrun_on_two_gpus_trains_like_one(data_dir, tmp_path):
    from tests.test_distributed import ENV, args, final_metrics, succeed, torchrun

    one, two = tmp_path / "one", tmp_path / "two"
    same = ["--model-kwargs", '{"batch_norm": false, "dropout": 0, "num_pointwise": 0}']
    same += ["--lr", "0.05", "--schedule", "constant"]
    single = [sys.executable, "-m", "nin", *args(data_dir, one), *same]
    subprocess.run(single, env=ENV, check=True, capture_output=True)
    out = succeed(torchrun(*args(data_dir, two), *same))
    assert "2 processes, global batch 128" in out and "on cuda:0" in out
    a, b = final_metrics(one), final_metrics(two)
    assert a["loss"] < 2.0
    # Looser than on the CPU: TF32 and other kernels for half the batch per GPU.
    assert abs(a["loss"] - b["loss"]) <= 0.02 * a["loss"], (a, b)
    assert abs(a["test_acc"] - b["test_acc"]) <= 0.02, (a, b)
