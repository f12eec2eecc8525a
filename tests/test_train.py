import json

import pytest
import torch

from nin.checkpoint import load_checkpoint
from nin.errors import NinError
from nin.train import make_config, train

QUICK = dict(train_subset=5000, test_subset=1000, epochs=2, batch_size=128)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One short compact run on a real Fashion-MNIST subset, shared by the tests below."""
    from .conftest import SHARED_DATA

    if not (SHARED_DATA / "fashion-mnist").is_dir():
        pytest.skip("real data not found")
    out = tmp_path_factory.mktemp("run")
    config = make_config("compact", data_dir=str(SHARED_DATA), out=str(out), **QUICK)
    return config, train(config, log=lambda line: None), out


def test_short_run_learns_well_above_chance(quick_run):
    _, result, _ = quick_run
    # 5,000 real training images, 2 epochs: chance is 0.10.
    assert result["test_acc"] > 0.7
    assert result["history"][1]["loss"] < result["history"][0]["loss"]


def test_same_seed_same_metrics(data_dir, tmp_path):
    def metrics(seed, out):
        config = make_config(
            "compact", data_dir=str(data_dir), out=str(tmp_path / out), seed=seed,
            train_subset=1000, test_subset=500, epochs=1, batch_size=100,
        )  # fmt: skip
        row = train(config, log=lambda line: None)["history"][0]
        return [row[k] for k in ("loss", "train_acc", "test_acc")]

    assert metrics(3, "a") == metrics(3, "b")
    assert metrics(3, "a") != metrics(4, "c")


def test_run_directory_holds_everything(quick_run):
    _, result, out = quick_run
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "nin_compact" and config["result"]["test_acc"] == result["test_acc"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_checkpoint_reloads_the_same_model(quick_run):
    _, _, out = quick_run
    model, config = load_checkpoint(out)
    again, _ = load_checkpoint(out / "model.safetensors")
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(model.eval()(x), again.eval()(x))
    assert config["preset"] == "compact"


def test_broken_checkpoints_get_one_line_errors(quick_run, tmp_path):
    _, _, out = quick_run
    (tmp_path / "config.json").write_text((out / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"\x80\x04 not safetensors")
    with pytest.raises(NinError, match="not a readable safetensors"):
        load_checkpoint(tmp_path)
    config = json.loads((out / "config.json").read_text())
    config["model"] = "nin_d2l"
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    with pytest.raises(NinError, match="do not fit model 'nin_d2l'"):
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
    ],
)
def test_bad_settings_are_refused(overrides, message):
    with pytest.raises(NinError, match=message):
        make_config("compact", **overrides)
    with pytest.raises(NinError, match="unknown preset"):
        make_config("fastest")


def test_d2l_preset_is_the_chapter():
    config = make_config("d2l")
    assert (config.model, config.lr, config.epochs, config.batch_size) == ("nin_d2l", 0.1, 10, 128)
    assert (config.resize, config.init, config.momentum, config.normalize) == (
        224,
        "xavier",
        0,
        False,
    )


def test_impossible_input_size_stops_before_training(data_dir, tmp_path):
    config = make_config("d2l", resize=28, data_dir=str(data_dir), out=str(tmp_path / "run"))
    with pytest.raises(NinError, match="cannot take input"):
        train(config, log=lambda line: None)
    assert not (tmp_path / "run").exists()
