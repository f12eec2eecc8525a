import json
import math
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nin.train
from nin.checkpoint import load_checkpoint, read_tensors
from nin.config import TrainConfig, make_config
from nin.device import place_model
from nin.errors import NinError
from nin.evaluate import accuracy, evaluate
from nin.folders import load_folder
from nin.loaders import make_loader
from nin.train import train

QUICK = dict(train_subset=5000, test_subset=1000, epochs=2, batch_size=128)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One short compact run on a real Fashion-MNIST subset, shared by the tests below."""
    from .conftest import SHARED_DATA

    if not (SHARED_DATA / "fashion-mnist").is_dir():
        pytest.skip("real data not found")
    out = tmp_path_factory.mktemp("run")
    config = make_config("compact", data_dir=str(SHARED_DATA), out=str(out), **QUICK)
    lines: list[str] = []
    return config, {**train(config, log=lines.append), "log": lines}, out


def test_short_run_learns_well_above_chance(quick_run):
    _, result, _ = quick_run
    # 5,000 real training images, 2 epochs: chance is 0.10.
    assert result["test_acc"] > 0.7
    assert result["history"][1]["loss"] < result["history"][0]["loss"]
    # A run that learns is not called a guess; its last line says which accuracy is the result.
    assert not any("no better than guessing" in line for line in result["log"])
    assert result["log"][-1].startswith(f"result: test acc {result['test_acc']:.3f} of the last "
                                        "epoch's weights, with test-time augmentation")  # fmt: skip


def test_same_seed_same_metrics(data_dir, tmp_path):
    def metrics(seed, out):
        config = make_config(
            "compact", data_dir=str(data_dir), out=str(tmp_path / out), seed=seed,
            train_subset=1000, test_subset=500, epochs=1, batch_size=100,
        )  # fmt: skip
        row = train(config, log=lambda line: None)["history"][0]
        return [row[k] for k in ("loss", "train_acc", "test_acc")]

    first = metrics(3, "a")
    assert metrics(3, "b") == first
    assert metrics(4, "c") != first


def test_elapsed_and_wall_seconds_count_each_second_once(tmp_path, data_dir):
    """The run's clock: within the time the call took, every epoch later than the one before."""
    config = make_config(
        "compact", data_dir=str(data_dir), out=str(tmp_path / "run"), train_subset=500,
        test_subset=200, epochs=3, batch_size=100, tta=0,
    )  # fmt: skip
    start = time.perf_counter()
    result = train(config, log=lambda line: None)
    outer = time.perf_counter() - start
    elapsed = [row["elapsed_seconds"] for row in result["history"]]
    assert elapsed == sorted(elapsed) and 0 < elapsed[-1] <= result["wall_seconds"] <= outer


def test_run_directory_holds_everything(quick_run):
    _, result, out = quick_run
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "nin_compact" and config["result"]["test_acc"] == result["test_acc"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_checkpoint_reloads_the_trained_model(quick_run):
    config, result, out = quick_run
    model, saved = load_checkpoint(out)
    assert saved["preset"] == "compact" and saved["result"]["test_acc"] == result["test_acc"]
    device = torch.device("cpu")
    place_model(model, device, config.channels_last)
    evaluation = evaluate(model, make_loader(config, "test", device), 10, config.amp, config.tta)
    assert evaluation.accuracy == accuracy(evaluation.confusion) == result["test_acc"]
    again, _ = load_checkpoint(out / "model.safetensors")  # the weights file names the run too
    pairs = zip(model.state_dict().values(), again.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_broken_checkpoints_get_one_line_errors(quick_run, tmp_path):
    _, _, out = quick_run
    (tmp_path / "config.json").write_text((out / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"\x04\x80 not safetensors")
    with pytest.raises(NinError, match="not a readable safetensors"):
        load_checkpoint(tmp_path)
    config = json.loads((out / "config.json").read_text())
    config["model"] = "nin_d2l"
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    with pytest.raises(NinError, match="weights of model 'nin_compact', but the config says"):
        load_checkpoint(tmp_path)
    with pytest.raises(NinError, match="not found"):
        load_checkpoint(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(epochs=0), "--epochs must be at least 1"),
        (dict(lr=-0.1), "--lr must be a positive"),
        (dict(batch_size=0), "--batch-size must be at least 1"),
        (dict(model="vgg"), "unknown model"),
        (dict(dataset="cifar"), "unknown data set"),
        (dict(momentum=-0.9), "--momentum must be 0 or more"),
        (dict(weight_decay=-1e-4), "--weight-decay must be 0 or more"),
        (dict(label_smoothing=1.5), "--label-smoothing must be in"),
        (dict(resize=0), "--resize must be at least 1"),
    ],
)
def test_bad_settings_are_refused(overrides, message):
    with pytest.raises(NinError, match=message):
        make_config("compact", **overrides)
    with pytest.raises(NinError, match="unknown preset"):
        make_config("fastest")


def test_d2l_preset_is_the_chapter():
    chapter = TrainConfig(
        preset="d2l", model="nin_d2l", dataset="fashion-mnist", epochs=10, lr=0.1,
        batch_size=128, resize=224, momentum=0.0, nesterov=False, weight_decay=0.0,
        schedule="constant", label_smoothing=0.0, flip=False, crop_padding=0, init="xavier",
        normalize=False, amp=False, channels_last=False,
    )  # fmt: skip
    assert make_config("d2l") == chapter


def test_optimizer_runs_the_configured_momentum(data_dir, tmp_path):
    seen = []
    config = make_config(
        "compact", data_dir=str(data_dir), out=str(tmp_path), momentum=0.5,
        train_subset=600, test_subset=100, epochs=1, batch_size=200,
    )  # fmt: skip
    original = torch.optim.SGD.step

    def spy(self, *args, **kwargs):
        seen.append([(g["momentum"], g["nesterov"]) for g in self.param_groups])
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.SGD, "step", spy)
        train(config, log=lambda line: None)
    assert seen and all(groups == [(0.5, True)] for groups in seen)


def test_impossible_input_size_stops_before_training(data_dir, tmp_path):
    config = make_config("d2l", resize=28, data_dir=str(data_dir), out=str(tmp_path / "run"))
    with pytest.raises(NinError, match="cannot take input"):
        train(config, log=lambda line: None)
    assert not (tmp_path / "run").exists()


def test_holdout_validates_on_training_images_and_never_reads_test(data_dir, tmp_path):
    config = make_config(
        "compact", data_dir=str(data_dir), out=str(tmp_path), holdout=500,
        train_subset=600, epochs=1, batch_size=200,
    )  # fmt: skip
    train_loader = make_loader(config, "train", torch.device("cpu"))
    val_loader = make_loader(config, "val", torch.device("cpu"))
    assert (train_loader.num_examples, val_loader.num_examples) == (600, 500)
    # Validation is the last 500 training images; training never sees them.
    from nin.data import load_split

    images, _ = load_split("fashion-mnist", "train", str(data_dir))
    assert torch.equal(val_loader.images, images[-500:])
    assert torch.equal(train_loader.images, images[:600])
    result = train(config, log=lambda line: None)
    assert "val_acc" in result and "test_acc" not in result
    assert all("test_acc" not in row for row in result["history"])


def test_holdout_larger_than_the_split_is_refused(data_dir, tmp_path):
    config = make_config("compact", data_dir=str(data_dir), out=str(tmp_path), holdout=60000)
    with pytest.raises(NinError, match="--holdout must be in"):
        make_loader(config, "train", torch.device("cpu"))
    with pytest.raises(NinError, match="--holdout must be 0 or more"):
        make_config("compact", holdout=-1)


# --- The fast path: same numbers as the plain path, no host sync per step, collapse caught ----


def test_fast_path_follows_the_plain_paths_loss(data_dir):
    from nin.data import load_split
    from nin.models import create_model
    from nin.train import train_step

    images, labels = load_split("fashion-mnist", "train", str(data_dir))
    x, y = images[:512].float().div(255), labels[:512].long()
    losses = {}
    for fast in (False, True):
        torch.manual_seed(0)
        model = place_model(create_model("nin_compact"), torch.device("cpu"), channels_last=fast)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        batch = x.contiguous(memory_format=torch.channels_last) if fast else x
        losses[fast] = []
        for step in range(6):
            part = slice(step * 64, (step + 1) * 64)
            logits = train_step(
                model, batch[part], y[part], optimizer, torch.nn.CrossEntropyLoss(), amp=fast
            )
            losses[fast].append(torch.nn.functional.cross_entropy(logits.float(), y[part]).item())
    # bfloat16 autocast and channels-last change rounding, not the trajectory.
    assert losses[True] == pytest.approx(losses[False], rel=0.03)
    assert losses[False][-1] < losses[False][0]


# Every way Python code can wait for the device: read a value back (item, tolist, cpu, numpy,
# and bool/int/float/index of a tensor, as `if loss > x:` or `range(n)` do), or ask for a result
# whose size depends on the values (nonzero, a boolean mask as an index). len() and .shape are
# metadata, not reads.
HOST_READS = (
    "item", "tolist", "cpu", "numpy", "__array__",
    "__bool__", "__int__", "__float__", "__index__", "__complex__",
    "nonzero",
)  # fmt: skip


def count_host_reads(monkeypatch) -> list[str]:
    """Record every tensor-to-host read (see HOST_READS) made from now on, by name."""
    reads = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    original_nonzero = torch.nonzero

    def nonzero(*args, **kwargs):
        reads.append("torch.nonzero")
        return original_nonzero(*args, **kwargs)

    monkeypatch.setattr(torch, "nonzero", nonzero)

    def masked(index) -> bool:
        parts = index if isinstance(index, tuple) else (index,)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in parts)

    for name in ("__getitem__", "__setitem__"):
        original = getattr(torch.Tensor, name)

        def spy(self, index, *value, _name=name, _original=original):
            if masked(index):
                reads.append(f"mask {_name}")
            return _original(self, index, *value)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return reads


def test_the_host_read_spy_sees_every_kind_of_read(monkeypatch):
    t, mask = torch.ones(3), torch.tensor([True, False, True])
    with monkeypatch.context() as patch:
        reads = count_host_reads(patch)
        _ = len(t), t.shape, t + 1, t[1:], t[torch.tensor([0, 2])]  # no reads
        t[0] = 1
        assert reads == []
        if t.sum() > 0:  # bool
            pass
        _ = int(t[0]), float(t[0]), range(t[0].long()), t.sum().item(), t.tolist()
        _ = t.cpu(), t.numpy(), t.nonzero(), torch.nonzero(t), t[mask]
        t[mask] = 0
    assert reads == [
        "__bool__", "__int__", "__float__", "__index__", "item", "tolist", "cpu", "numpy",
        "nonzero", "torch.nonzero", "mask __getitem__", "mask __setitem__",
    ]  # fmt: skip


def test_no_host_sync_per_step(data_dir, tmp_path, monkeypatch):
    counts = {}
    for steps in (4, 8):
        # Flips and crops too: the augmentation runs in every step.
        config = make_config(
            "compact", data_dir=str(data_dir), out=str(tmp_path / str(steps)),
            train_subset=128 * steps, test_subset=256, epochs=1, batch_size=128,
            flip=True, crop_padding=2,
        )  # fmt: skip
        with monkeypatch.context() as patch:
            reads = count_host_reads(patch)
            train(config, log=lambda line: None)
        counts[steps] = Counter(reads)
    # Reads happen per epoch (metrics, checkpoint, the watch's poll), never per step: twice the
    # steps, the same reads of each kind.
    assert counts[4] == counts[8] and counts[4], counts


def test_collapse_stops_the_run_early_with_a_clear_message(data_dir, tmp_path, monkeypatch):
    import nin.train
    from nin.models import create_model

    def dead_model(name, **kwargs):
        model = create_model("nin_compact", batch_norm=False, final_relu=True, **kwargs)
        last_conv = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        with torch.no_grad():
            last_conv.bias.fill_(-1e4)  # the ReLU before pooling is dead from the start
        return model

    monkeypatch.setattr(nin.train, "create_model", dead_model)
    config = make_config(
        "compact", data_dir=str(data_dir), out=str(tmp_path), train_subset=2560,
        test_subset=256, epochs=3, batch_size=256, collapse_steps=4,
    )  # fmt: skip
    message = r"collapsed in epoch 1: every image has got the same logits for the last 4 steps"
    with pytest.raises(NinError, match=message):
        train(config, log=lambda line: None)
    # Stopped inside the first epoch, before any checkpoint: what the run wrote is removed.
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "config.json").exists()


def watch_step(watch, logits, loss=2.0, correct=4):
    """Feed one step of `logits` (8 images) with a given mean loss and number correct."""
    n = len(logits)
    return watch.update(logits, torch.tensor(loss * n), torch.tensor(correct))


def test_collapse_watch_needs_consecutive_flat_steps():
    from nin.watch import TrainingWatch

    watch = TrainingWatch(4, 0, 10, torch.device("cpu"), window=2)
    flat, alive = torch.zeros(8, 10), torch.randn(8, 10)
    assert [watch_step(watch, t) for t in (flat, flat, alive, flat, flat, flat)] == [False] * 6
    assert watch_step(watch, flat) is False and watch_step(watch, flat) is True
    assert watch.reason == "collapsed"
    # An earlier dead layer: logits differ per class but are the same for every image.
    constant = torch.randn(1, 10).expand(8, 10)
    watch = TrainingWatch(2, 0, 10, torch.device("cpu"), window=2)
    assert [watch_step(watch, constant) for _ in range(2)] == [False, True]
    watch = TrainingWatch(0, 0, 10, torch.device("cpu"))
    assert not any(watch_step(watch, flat) for _ in range(200))


def test_watch_stops_a_loss_stuck_at_chance_and_a_non_finite_loss():
    import math

    from nin.watch import TrainingWatch

    alive = torch.randn(8, 10)
    watch = TrainingWatch(0, 4, 10, torch.device("cpu"), window=2)
    chance = math.log(10)
    # Learning (loss below ln 10) resets the count; four steps at chance in a row stop it.
    steps = [(chance, 1), (chance, 1), (1.0, 6), (1.0, 6), (chance, 0), (chance, 1)]
    assert [watch_step(watch, alive, *s) for s in steps] == [False] * 6
    assert [watch_step(watch, alive, chance, 1) for _ in range(2)] == [False, True]
    assert watch.reason == "stuck"
    assert "stayed at ln 10 = 2.303 with accuracy at chance for 4 steps" in str(
        watch.error(1, 0.1, Path("missing"))
    )
    # Many right answers at that loss is not chance: no stop.
    watch = TrainingWatch(0, 2, 10, torch.device("cpu"), window=2)
    assert not any(watch_step(watch, alive, chance, 8) for _ in range(10))
    # A NaN or infinite loss stops at the next read, whatever the other counters say.
    watch = TrainingWatch(0, 0, 10, torch.device("cpu"), window=3)
    assert watch_step(watch, alive, float("nan")) is False
    assert watch.poll() is True and watch.reason == "diverged"


def test_linear_scaling_rule_for_larger_batches():
    assert make_config("compact", scale_lr=True, batch_size=1024).lr == pytest.approx(0.8)
    assert make_config("d2l", scale_lr=True, batch_size=512).lr == pytest.approx(0.4)
    # An explicit --lr wins; without --scale-lr the preset's lr stays.
    assert make_config("compact", scale_lr=True, batch_size=1024, lr=0.3).lr == 0.3
    assert make_config("compact", batch_size=1024).lr == 0.2


def test_fused_optimizer_switch(data_dir, tmp_path, monkeypatch):
    seen = []
    original = torch.optim.SGD.__init__

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("fused"))
        original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "__init__", spy)
    for fused in (False, True):
        config = make_config(
            "compact", data_dir=str(data_dir), out=str(tmp_path / str(fused)), fused=fused,
            train_subset=256, test_subset=256, epochs=1,
        )  # fmt: skip
        train(config, log=lambda line: None)
    assert seen == [None, True]


def test_float16_autocast_with_loss_scaling_trains(data_dir, monkeypatch):
    # GPUs without bfloat16 get float16 and a GradScaler; the same path runs on the CPU here.
    import nin.device
    from nin.data import load_split
    from nin.device import grad_scaler
    from nin.models import create_model
    from nin.train import train_step

    monkeypatch.setattr(nin.device, "amp_dtype", lambda device: torch.float16)
    images, labels = load_split("fashion-mnist", "train", str(data_dir))
    x, y = images[:256].float().div(255), labels[:256].long()
    torch.manual_seed(0)
    model = create_model("nin_compact")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = grad_scaler(torch.device("cpu"), amp=True)
    assert scaler.is_enabled() and not grad_scaler(torch.device("cpu"), amp=False).is_enabled()
    losses = []
    for _ in range(8):
        logits = train_step(model, x, y, optimizer, torch.nn.CrossEntropyLoss(), True, scaler)
        assert logits.dtype == torch.float16
        losses.append(torch.nn.functional.cross_entropy(logits.float(), y).item())
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(
    data_dir, tmp_path, monkeypatch
):
    import nin.train
    from nin.checkpoint import LAST, read_tensors

    real_step = nin.train.train_step
    calls = []

    def blow_up_at_step_6(model, x, *args):
        logits = real_step(model, x, *args)
        calls.append(1)
        if len(calls) == 6:  # the update blows the weights up after this step's loss was fine
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("inf"))
        return logits

    monkeypatch.setattr(nin.train, "train_step", blow_up_at_step_6)
    config = make_config(
        "compact", data_dir=str(data_dir), out=str(tmp_path), train_subset=1024,
        test_subset=128, epochs=2, batch_size=64, checkpoint_every=3,
    )  # fmt: skip
    with pytest.raises(NinError, match=r"training diverged in epoch 1: the loss became infinite"):
        train(config, log=lambda line: None)
    calls.clear()
    with pytest.raises(NinError) as error:
        train(make_config(**{**vars(config), "out": str(tmp_path / "b")}), log=lambda line: None)
    assert f"the last good checkpoint is {tmp_path / 'b' / LAST}; try a lower --lr" in str(
        error.value
    )
    tensors, metadata = read_tensors(tmp_path / LAST)
    # The checkpoint due at step 6 found the weights blown up and was not written.
    assert json.loads(metadata["state"])["run"]["step"] == 3
    assert all(torch.isfinite(t).all() for k, t in tensors.items() if k.startswith("model."))


def test_on_epoch_gets_each_epochs_row(data_dir, tmp_path):
    rows = []
    config = make_config(
        "compact", data_dir=str(data_dir), out=str(tmp_path / "run"), epochs=2,
        train_subset=512, test_subset=256, batch_size=128,
    )  # fmt: skip
    result = train(config, log=lambda line: None, on_epoch=rows.append)
    assert [r["epoch"] for r in rows] == [1, 2] and rows == result["history"]


# --- a small folder of your own: a batch size that fits, the best epoch, the verdict, progress


def grey_folder(root: Path, levels: tuple[int, ...], per_class: int = 20) -> Path:
    """A folder of 8×8 grey PNGs, one class a brightness level (a little noise on top)."""
    rng = np.random.default_rng(0)
    for c, level in enumerate(levels):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(level + rng.integers(-10, 11, (8, 8)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i:03d}.png")
    (root / "class0" / "notes.txt").write_text("not a picture")  # skipped, and listed
    return root


def folder_run(tmp_path: Path, monkeypatch, levels: tuple[int, ...], epochs: int) -> tuple:
    """A compact run with the preset's batch size on a grey folder: its lines and result."""
    monkeypatch.setenv("NIN_CACHE_DIR", str(tmp_path / "cache"))
    load_folder.cache_clear()
    root = grey_folder(tmp_path / "pictures", levels)
    config = make_config("compact", data=str(root), out=str(tmp_path / "run"), epochs=epochs,
                         amp=False, tta=0, device="cpu")  # fmt: skip
    lines: list[str] = []
    return lines, train(config, log=lines.append)


def test_a_small_folder_trains_with_the_preset_batch_size_and_keeps_its_best_epoch(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(nin.train, "PROGRESS_SECONDS", 0.0)  # a line every step
    lines, result = folder_run(tmp_path, monkeypatch, (20, 120, 220), epochs=2)
    # 60 pictures, 6 carved for validation: batches of 8, not the preset's 256.
    assert "nin: batches of 8, not 256: 54 training images make 7 steps an epoch" in lines[1]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["batch_size"] == 8
    skipped = (tmp_path / "run" / "skipped.txt").read_text()
    assert skipped.startswith("class0/notes.txt\tnot a PNG or JPEG"), skipped
    # Output that is not a terminal gets progress lines: step, pace, time left.
    steps = [line for line in lines if re.fullmatch(
        r"epoch \d/2: step \d/7, [\d.]+ images/s, about \d+ s left", line)]  # fmt: skip
    assert len(steps) == 14, lines
    # The result is the best epoch on validation (the first, on a tie), its weights saved.
    best = max(result["history"], key=lambda row: row["val_acc"])
    assert result["epoch"] == best["epoch"] and result["val_acc"] == best["val_acc"]
    line = next(x for x in lines if x.startswith("result: "))
    assert line.startswith(
        f"result: val acc {best['val_acc']:.3f} of epoch {best['epoch']}'s weights, the best on "
        "validation, no test-time augmentation; loss"
    ), line
    saved_weights = read_tensors(tmp_path / "run" / "model.safetensors")[0]
    best_weights = read_tensors(tmp_path / "run" / "best.safetensors")[0]
    assert all(torch.equal(saved_weights[k], best_weights[k]) for k in best_weights)


def test_a_run_that_learns_nothing_says_so(tmp_path, monkeypatch):
    # Every class the same picture: nothing to learn, whatever the network does.
    lines, result = folder_run(tmp_path, monkeypatch, (120, 120, 120), epochs=1)
    assert lines[-1].startswith(
        f"nin: this model is no better than guessing: val acc {result['val_acc']:.3f} on 6 "
        "images is within chance of the 0.333 that always answering the commonest class scores"
    ), lines[-1]
    assert "--epochs" in lines[-1] and "more pictures" in lines[-1] and "lower --lr" in lines[-1]
