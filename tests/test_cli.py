import re
import subprocess
import sys

import pytest

from .conftest import SHARED_DATA


def nin(*args, check=True):
    result = subprocess.run(
        [sys.executable, "-m", "nin", *args], capture_output=True, text=True, timeout=600
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_summary_shows_the_chapters_shapes():
    out = nin("summary", "nin_d2l").stdout
    for shape in ["1×96×54×54", "1×96×26×26", "1×256×26×26", "1×256×12×12", "1×384×12×12",
                  "1×384×5×5", "1×10×5×5", "1×10×1×1"]:  # fmt: skip
        assert shape in out
    assert "1,992,166" in out and "1.52 GFLOP" in out


def test_summary_with_input_size():
    out = nin("summary", "nin_compact", "--input-size", "1", "32", "32").stdout
    assert "input 1×1×32×32" in out


def test_models_lists_the_registry():
    out = nin("models").stdout
    assert "nin_d2l" in out and "1,992,166" in out and "nin_imagenet" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["summary", "nin_x"], "unknown model 'nin_x'"),
        (["summary", "nin_d2l", "--input-size", "1", "28", "28"], "cannot take input"),
        (["train", "--epochs", "0"], "--epochs must be at least 1"),
        (["eval", "/nonexistent/run"], "not found"),
        (["resources", "nin_d2l", "--input-size", "1", "28", "28"], "cannot take input"),
        (["resources", "nin_compact", "--batch-size", "0"], "--batch-size must be positive"),
        (["resources", "nin_x"], "unknown model 'nin_x'"),
        (["exercises", "nope"], "unknown exercise 'nope'"),
        (["exercises", "linear", "--seeds", "0"], "--seeds must be at least 1"),
        (["exercises", "linear", "--out", "/proc/nin-exercises"], "cannot write to"),
    ],
)
def test_bad_input_gets_one_line_error(args, message):
    result = nin(*args, check=False)
    assert result.returncode == 1
    assert message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_train_then_eval(tmp_path):
    if not (SHARED_DATA / "fashion-mnist").is_dir():
        pytest.skip("real data not found")
    run = tmp_path / "run"
    common = ["--data-dir", str(SHARED_DATA), "--test-subset", "500", "--device", "cpu"]
    out = nin("train", "--epochs", "1", "--train-subset", "1000", "--out", str(run), *common).stdout
    lines = [line for line in out.strip().splitlines() if ": step " not in line]  # no progress
    # The first line names the network, data and size run, then the preset and device.
    assert lines[0].startswith("nin: nin_compact on fashion-mnist at 28×28, 1 epoch (preset "
                               "compact, the default") and "on cpu" in lines[0]  # fmt: skip
    assert re.fullmatch(r"epoch 1/1: loss [\d.]+, train acc [\d.]+, test acc [\d.]+, .*", lines[1])
    # One says which accuracy is the result, and what test-time augmentation added (the last
    # may then say that 4 steps made a model no better than guessing).
    result = next(line for line in lines if line.startswith("result: "))
    summary = re.fullmatch(
        r"result: test acc ([\d.]+) of the last epoch's weights, with test-time augmentation "
        r"\(flip and 1-pixel shifts: [-+][\d.]+ on [\d.]+ without\); loss [\d.]+, train acc "
        r"[\d.]+, [\d.]+ examples/sec on cpu",
        result,
    )
    assert summary, result
    evaluated = nin("eval", str(run), *common).stdout
    assert "t-shirt/top" in evaluated and "ankle boot" in evaluated
    # The reloaded checkpoint scores what training reported on the same images.
    reloaded = float(re.search(r"test acc ([\d.]+)", evaluated).group(1))
    assert abs(reloaded - float(summary.group(1))) <= 0.0005


def test_train_help_shows_what_a_plain_run_runs(capsys):
    from nin.cli import build_parser
    from nin.config import make_config

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    plain = make_config()  # what `nin train` alone runs
    assert f"passes over the training set (default {plain.epochs})" in text
    assert f"(the peak, with a schedule) (default {plain.lr})" in text
    assert f"(default {plain.batch_size})" in text and "defaults:" not in text
    rest = text.split("any preset, what it does not set:")[1]
    assert "epochs" not in rest and " lr " not in rest and "momentum 0.0" in rest


def test_resources_prints_analytic_beside_measured():
    out = nin("resources", "nin_compact", "--batch-size", "1", "4").stdout
    assert out.count("nin_compact, input") == 2 and "input 4×1×28×28" in out
    assert "324,874" in out and "saved activations" in out and "not measured" not in out
    assert "USDT" not in out


def test_exercises_prints_the_answer_and_writes_its_readme_when_asked(tmp_path):
    result = nin("exercises", "linear", "--out", str(tmp_path))  # --out implies --write
    assert result.stdout.startswith("## Idea: a 1×1 convolution is a fully connected layer per")
    readme = (tmp_path / "README.md").read_text()
    assert readme.endswith(result.stdout)  # the printed answer is the page's section
    assert "`nin exercises linear --seeds 3`" in readme
