"""nin train --finetune: a new run that starts from trained weights, its class maps made anew."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from nin.cli import main
from nin.config import make_config
from nin.models import create_model, list_models
from nin.pretrained import class_map, finetune_config, freeze_body, load_body, load_pretrained
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
