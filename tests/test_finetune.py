"""nin train --finetune: a new run that starts from trained weights, its class maps made anew."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from nin.cli import main
from nin.config import make_config
from nin.data import dataset_spec, load_split
from nin.models import create_model, list_models
from nin.pretrained import (
    PRETRAINED,
    class_map,
    finetune_config,
    freeze_body,
    load_body,
    load_pretrained,
    pretrained_dir,
)
from nin.train import train


@pytest.mark.parametrize("name", list_models())
def test_the_class_maps_are_the_layers_at_the_classes_width(name):
    model = create_model(name, num_classes=7)
    head = class_map(model, 7)
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[-1] in head and not set(convs[:-3]) & set(head)
    for n in head:  # every convolution there ends at the classes' width
        module = model.get_submodule(n)
        assert not isinstance(module, torch.nn.Conv2d) or module.out_channels == 7


def test_the_body_comes_from_the_source_and_the_class_maps_do_not():
    trained, _ = load_pretrained("fashion-mnist")
    torch.manual_seed(0)
    model = create_model("nin_compact", num_classes=3)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    load_body(model, "fashion-mnist", 3)
    head = class_map(model, 3)
    for key, value in model.state_dict().items():
        if any(key.startswith(f"{h}.") for h in head):
            assert torch.equal(value, fresh[key])  # as initialised: learns the new classes
        else:
            assert torch.equal(value, trained.state_dict()[key])
    freeze_body(model, 3, frozen=True)
    learning = {n for n, p in model.named_parameters() if p.requires_grad}
    assert learning and all(any(n.startswith(f"{h}.") for h in head) for n in learning)
    freeze_body(model, 3, frozen=False)
    assert all(p.requires_grad for p in model.parameters())


def test_the_run_takes_the_sources_network_size_and_a_lower_lr():
    config = finetune_config(make_config("compact", data="folder", finetune="fashion-mnist"))
    assert (config.model, config.resize, config.channels) == ("nin_compact", 28, 1)
    assert config.lr == pytest.approx(make_config("compact").lr / 10)


def test_a_folder_run_fine_tunes_and_resumes(tmp_path, capsys):
    for c, name in enumerate(("dark", "light")):  # two classes a fresh head can tell apart
        (tmp_path / "pics" / name).mkdir(parents=True)
        for i in range(12):
            shade = 40 + 150 * c + 3 * i
            Image.new("L", (20, 20), shade).save(tmp_path / "pics" / name / f"{i}.png")
    config = make_config("compact", data=str(tmp_path / "pics"), finetune="fashion-mnist",
                         epochs=2, batch_size=8, out=str(tmp_path / "run"))  # fmt: skip

    def stop(metrics: dict) -> None:
        raise KeyboardInterrupt  # killed after its first epoch's checkpoint

    with pytest.raises(KeyboardInterrupt):
        train(config, on_epoch=stop)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["model"], saved["lr"]) == ("nin_compact", pytest.approx(0.02))
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0
    again = json.loads((tmp_path / "run" / "config.json").read_text())
    assert again["lr"] == saved["lr"]  # the resumed run's lr is not cut again


def test_an_unknown_source_is_one_line(tmp_path, capsys):
    (tmp_path / "pics" / "a").mkdir(parents=True)
    (tmp_path / "pics" / "b").mkdir(parents=True)
    for d in ("a", "b"):
        for i in range(4):
            Image.new("L", (8, 8), i * 40).save(tmp_path / "pics" / d / f"{i}.png")
    code = main(["train", "--data", str(tmp_path / "pics"), "--finetune", "nosuch",
                 "--out", str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err
    assert code != 0 and "no such run directory" in err and "fashion-mnist" in err
    assert not Path(tmp_path / "run").exists()


def cifar_folder(root: Path, data_dir: Path, per_class: int, offset: int = 0) -> Path:
    """PER_CLASS pictures of CIFAR-10's first three classes, from its test split (which the
    bundled cifar10 model never trained on), as root/<class>/<index>.png."""
    images, labels = load_split("cifar10", "test", str(data_dir))
    for c, name in enumerate(dataset_spec("cifar10").classes[:3]):
        (root / name).mkdir(parents=True)
        for i in (labels == c).nonzero().flatten()[offset : offset + per_class].tolist():
            Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(root / name / f"{i}.png")
    return root


def test_fine_tuning_the_cifar10_model_beats_training_from_scratch(tmp_path, data_dir):
    if not (data_dir / "cifar-10").is_dir():
        pytest.skip("CIFAR-10 not found in the test data")
    folder = cifar_folder(tmp_path / "pics", data_dir, 40)
    common = dict(data=str(folder), epochs=4, batch_size=16, holdout=30, tta=0)
    scratch = make_config("compact", model="nin_fast", model_kwargs={}, resize=32, **common)
    tuned = make_config("compact", finetune="cifar10", **common)
    accs = [
        train(config, log=lambda line: None)["val_acc"]
        for config in (
            dataclasses.replace(c, out=str(tmp_path / n))
            for c, n in ((scratch, "scratch"), (tuned, "tuned"))
        )  # fmt: skip
    ]
    assert accs[1] >= 0.8 and accs[1] > accs[0] + 0.2, accs  # 30 validation pictures


def test_the_docs_quote_each_bundled_models_accuracy_from_its_record():
    text = (Path(__file__).parents[1] / "docs" / "using.md").read_text()
    for name in PRETRAINED:
        record = json.loads((pretrained_dir(name) / "metrics.json").read_text())
        assert f"{record['test_acc']:.4f}" in text, name


def test_a_source_of_other_channels_than_the_data_set_is_one_line(tmp_path, capsys):
    args = ["train", "--dataset", "cifar10", "--finetune", "fashion-mnist",
            "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(args) == 1
    assert "takes 1-channel images, cifar10 has 3" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
