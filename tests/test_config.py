"""TrainConfig is the one source of settings: every field a flag, saved configs load back."""

import dataclasses
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nin.train
from nin.cli import build_parser, main
from nin.config import FIELDS, TrainConfig, make_config, read_config_file, saved_config
from nin.errors import NinError
from nin.presets import PRESETS

# A value for every field that differs from every preset's, and the flag words that set it.
VALUES = {
    "model": ("nin_mnist", ["--model", "nin_mnist"]),
    "dataset": ("mnist", ["--dataset", "mnist"]),
    "data": ("my-pictures", ["--data", "my-pictures"]),
    "channels": (3, ["--channels", "3"]),
    "loader": ("stream", ["--loader", "stream"]),
    "epochs": (3, ["--epochs", "3"]),
    "lr": (0.05, ["--lr", "0.05"]),
    "batch_size": (64, ["--batch-size", "64"]),
    "resize": (32, ["--resize", "32"]),
    "momentum": (0.5, ["--momentum", "0.5"]),
    "nesterov": (True, ["--nesterov"]),
    "weight_decay": (0.01, ["--weight-decay", "0.01"]),
    "schedule": ("linear", ["--schedule", "linear"]),
    "label_smoothing": (0.3, ["--label-smoothing", "0.3"]),
    "flip": (True, ["--flip"]),
    "crop_padding": (3, ["--crop-padding", "3"]),
    "rotate": (12.5, ["--rotate", "12.5"]),
    "init": ("xavier", ["--init", "xavier"]),
    "normalize": (False, ["--no-normalize"]),
    "amp": (False, ["--no-amp"]),
    "channels_last": (False, ["--no-channels-last"]),
    "fused": (True, ["--fused"]),
    "bias_lr_scale": (2.0, ["--bias-lr-scale", "2"]),
    "paper_lr": (True, ["--paper-lr"]),
    "lookahead": (7, ["--lookahead", "7"]),
    "tta": (1, ["--tta", "1"]),
    "compile": (True, ["--compile"]),
    "seed": (9, ["--seed", "9"]),
    "device": ("cpu", ["--device", "cpu"]),
    "data_dir": ("somewhere", ["--data-dir", "somewhere"]),
    "out": ("runs/x", ["--out", "runs/x"]),
    "train_subset": (500, ["--train-subset", "500"]),
    "holdout": (100, ["--holdout", "100"]),
    "collapse_steps": (5, ["--collapse-steps", "5"]),
    "stuck_steps": (6, ["--stuck-steps", "6"]),
    "checkpoint_every": (8, ["--checkpoint-every", "8"]),
    "deterministic": (True, ["--deterministic"]),
    "test_subset": (200, ["--test-subset", "200"]),
    "model_kwargs": ({"dropout": 0.1}, ["--model-kwargs", '{"dropout": 0.1}']),
    "finetune": ("fashion-mnist", ["--finetune", "fashion-mnist"]),
}


@pytest.fixture
def trained(monkeypatch: pytest.MonkeyPatch) -> list[TrainConfig]:
    """The configs `nin train` would train with (nothing is trained)."""
    configs: list[TrainConfig] = []
    monkeypatch.setattr(nin.train, "train", lambda config, **_: configs.append(config))
    return configs


def test_every_field_has_a_flag_that_sets_it(trained: list[TrainConfig]) -> None:
    assert set(VALUES) == set(FIELDS) - {"preset"}  # a new field needs a row here
    argv = [word for _, words in VALUES.values() for word in words]
    assert main(["train", "--preset", "mnist", *argv]) == 0
    config = trained[0]
    for name, (value, _) in VALUES.items():
        assert getattr(config, name) == value, name
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for f in dataclasses.fields(TrainConfig):
        assert " ".join(f.metadata["help"].split()[:3]) in " ".join(help_text.split())


def test_a_runs_config_json_trains_the_same_config_again(
    trained: list[TrainConfig], tmp_path: Path
) -> None:
    config = make_config("cifar10-fast", epochs=2, seed=3, out=str(tmp_path / "old"))
    saved = {**dataclasses.asdict(config), "num_classes": 10, "result": {"test_acc": 0.5}}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert main(["train", "--config", str(tmp_path / "config.json"), "--seed", "4"]) == 0
    again = trained[0]
    assert again.preset == "cifar10-fast" and again.seed == 4  # flags win over the file
    assert dataclasses.replace(again, seed=3, out=config.out) == config
    assert saved_config(saved) == config  # the way eval, report and resume rebuild it


def test_a_toml_config_and_its_mistakes(trained: list[TrainConfig], tmp_path: Path, capsys) -> None:
    path = tmp_path / "recipe.toml"
    path.write_text('preset = "mnist"\nepochs = 2\nlr = 1\nmodel_kwargs = { dropout = 0.2 }\n')
    assert main(["train", "--config", str(path)]) == 0
    assert (trained[0].preset, trained[0].epochs, trained[0].lr) == ("mnist", 2, 1.0)
    assert trained[0].model_kwargs == {"width": 2.0, "dropout": 0.2}  # merged onto the preset's
    for text, message in (
        ('{"epochs": "ten"}', "--epochs must be int, got 'ten'"),
        ('{"amp": 1}', "--amp must be bool, got 1"),
        ('{"epoch": 3}', "unknown settings 'epoch'"),
        ('{"lr": 0.1', "not valid JSON"),
        ("[1, 2]", "not a table of settings"),
    ):
        path = tmp_path / "bad.json"
        path.write_text(text)
        assert main(["train", "--config", str(path)]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_presets_carry_notes_and_share_their_base() -> None:
    for name, preset in PRESETS.items():
        assert preset.note and set(preset.settings) <= set(FIELDS), name
        make_config(name)  # every preset is a valid config
    # The chapter's preset is the chapter: plain SGD in float32 at lr 0.1, batch 128, 224×224.
    d2l = make_config("d2l")
    assert (d2l.lr, d2l.batch_size, d2l.resize, d2l.epochs, d2l.init) == (
        0.1,
        128,
        224,
        10,
        "xavier",
    )
    assert (d2l.momentum, d2l.weight_decay, d2l.label_smoothing, d2l.amp) == (0, 0, 0, False)


# Any JSON value: what an untrusted config.json may hold.
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
# Mostly real setting names (a tenth not), to reach past the first check.
SETTINGS = st.dictionaries(st.sampled_from(sorted(FIELDS) * 9 + ["", "epoch\n"]), JSON, max_size=4)
KWARGS = st.just({}) | st.dictionaries(
    st.sampled_from(["num_pointwise", "batch_norm", "dropout", "head", "final_relu", "width"]),
    JSON,
    max_size=2,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    values=SETTINGS, kwargs=KWARGS, model=st.sampled_from(["nin_compact", "nin_fast", "nin_d2l"])
)
def test_any_config_file_is_a_config_or_one_line(values, kwargs, model, tmp_path: Path) -> None:
    """Whatever a config file holds: a checked TrainConfig, or a NinError; never another
    exception, a hang, or an allocation (the model is only ever built on the meta device)."""
    path = tmp_path / "fuzz.json"
    path.write_text(json.dumps({**values, "model": model, "model_kwargs": kwargs}, allow_nan=True))
    try:
        found = read_config_file(path)
        preset = found.pop("preset", "compact")
        config = make_config(preset if isinstance(preset, str) else "compact", **found)
    except NinError as e:
        assert "\n" not in str(e)
        return
    assert isinstance(config, TrainConfig) and config.epochs >= 1 and config.lr > 0


def test_train_help_shows_what_each_preset_sets(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for name, preset in PRESETS.items():
        assert f"{name}: " in shown, name
        for key, value in preset.settings.items():
            assert f"{key.replace('_', '-')} {value}" in shown, (name, key)
    assert "any preset, what it does not set: dataset fashion-mnist" in shown
