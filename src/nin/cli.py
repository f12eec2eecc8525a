"""The `nin` command line: models, summary, download, train, eval."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

from nin import __version__
from nin.errors import NinError, cut

MAX_MESSAGE = 1000  # characters of an error line; the rest is counted, not printed


def cmd_models(args: argparse.Namespace) -> None:
    """List the registered models with their input size and parameter count."""
    from nin.models import count_parameters, create_model, list_models, model_info

    for name in list_models():
        info = model_info(name)
        size = "×".join(map(str, info.input_size))
        params = count_parameters(create_model(name))
        print(f"{name:<14} {size:<11} {params:>11,} params  {info.description}")


def model_for_input(args: argparse.Namespace) -> tuple[Any, tuple[int, ...], list[Any]]:
    """The model `args.model` built for `args.input_size` (default: the model's own), checked."""
    from nin.config import check_model
    from nin.models import create_model, model_info
    from nin.resources import summarize

    try:  # the registry's own line: an unknown model, a bad number of classes
        info = model_info(args.model)
        size = tuple(args.input_size) if args.input_size else info.input_size
        if any(d < 1 for d in size):
            raise NinError(f"--input-size must be three positive numbers C H W, got {size}")
        check_model(args.model, {}, args.num_classes, size[0], max(size[1:]))
        model = create_model(args.model, num_classes=args.num_classes, in_channels=size[0])
    except ValueError as e:
        raise NinError(str(e)) from None
    try:
        rows = summarize(model, size)
    except RuntimeError as e:
        reason = str(e).splitlines()[0]
        raise NinError(f"model {args.model!r} cannot take input {size} ({reason})") from None
    return model, size, rows


def cmd_summary(args: argparse.Namespace) -> None:
    """Print the per-layer table of a model."""
    from nin.resources import format_summary

    _, size, rows = model_for_input(args)
    title = f"{args.model}, input 1×{'×'.join(map(str, size))}"
    print(format_summary(rows, title))


def cmd_resources(args: argparse.Namespace) -> None:
    """Print parameters, FLOPs and memory (analytic and measured) at each batch size."""
    from nin.device import pick_device
    from nin.resources import format_resources, measure_resources

    model, size, rows = model_for_input(args)
    if any(b < 1 for b in args.batch_size):
        raise NinError(f"--batch-size must be positive, got {args.batch_size}")
    device, _ = pick_device(args.device)
    model.to(device)
    for i, batch_size in enumerate(args.batch_size):
        found = measure_resources(model, args.model, size, batch_size, args.optimizer, rows)
        print(("\n" if i else "") + format_resources(found))


def cmd_download(args: argparse.Namespace) -> None:
    """Download and verify a data set's four files."""
    from nin.data import ensure_files

    for path in ensure_files(args.dataset, args.data_dir).values():
        print(f"ok  {path}")


def config_options(values: dict) -> dict:
    """The set entries of `values` that name TrainConfig fields (the preset aside)."""
    from nin.config import FIELDS

    return {k: v for k, v in values.items() if k in FIELDS and k != "preset" and v is not None}


def cmd_train(args: argparse.Namespace) -> None:
    """Train a model, or resume a run (see `nin train --help`)."""
    from nin.config import make_config, read_config_file
    from nin.train import resume_config, train

    given = config_options(vars(args))
    if args.resume:
        if args.preset is not None:
            given["preset"] = args.preset
        if args.scale_lr:
            given["scale_lr"] = True
        if args.config:
            given["config"] = args.config
        train(resume_config(args.resume, **given), resume=True)
        return
    values = read_config_file(args.config) if args.config else {}
    preset = args.preset or values.pop("preset", None) or "compact"
    values.pop("preset", None)
    train(make_config(preset, scale_lr=args.scale_lr, **{**values, **given}))


def cmd_eval(args: argparse.Namespace) -> None:
    """Reload a checkpoint and print its test accuracy, overall and per class."""
    from nin.data import data_name
    from nin.report import evaluate_checkpoint

    # This command's data directory, subset, batch size and device on the run's settings.
    _, config, loader, result = evaluate_checkpoint(args.checkpoint, **config_options(vars(args)))
    split = "validation" if loader.note.startswith("no test/") else "test"  # a folder's fallback
    where = f"{data_name(vars(config))} {split} split ({loader.num_examples} images)"
    print(f"{config.model} on {where}" + (f"; {loader.note}" if loader.note else ""))
    for name, acc in zip(loader.classes, result.per_class, strict=True):
        print(f"  {name:<12} {acc:.3f}")
    print(f"{'val' if split == 'validation' else 'test'} acc {result.accuracy:.4f}")


def cmd_exercises(args: argparse.Namespace) -> None:
    """Print the answers to the chapter's exercises; --write also saves them in their page."""
    from pathlib import Path

    from nin.exercises import main_log, run_exercises, write_readme

    out = Path(args.out or "docs/exercises")
    if args.rebuild:
        print(write_readme(out))
        return
    write = args.write or args.out is not None
    print(run_exercises(
        args.names, out if write else None, args.seeds, args.full, args.data_dir, args.device,
        main_log,
    ))  # fmt: skip


# --- using and shipping a model: predict, export, report, serve


def cmd_predict(args: argparse.Namespace) -> None:
    """Print the top classes of each image; a bad file gets one line on stderr, the rest go on."""
    from nin.predict import format_prediction, load_predictor, predict_files

    checkpoint, inputs = None, args.inputs
    if args.model is None:
        if len(inputs) < 2:
            raise NinError("give a CHECKPOINT and at least one image (or --model fashion-mnist)")
        checkpoint, inputs = inputs[0], inputs[1:]
    if args.top_k < 1:
        raise NinError(f"--top-k must be at least 1, got {args.top_k}")
    results = predict_files(load_predictor(checkpoint, args.model), inputs, args.top_k, args.invert)
    failed = [r for r in results if isinstance(r, NinError)]
    for error in failed:
        print(f"nin: error: {error}", file=sys.stderr)
    if args.json:
        rows = [{"error": str(r)} if isinstance(r, NinError) else r.as_dict() for r in results]
        print(json.dumps(rows, indent=2))
    else:
        print("\n".join(format_prediction(r) for r in results if not isinstance(r, NinError)))
    if failed:
        raise NinError(f"{len(failed)} of {len(results)} inputs failed (see above)")


def cmd_export(args: argparse.Namespace) -> None:
    """Export a checkpoint to ONNX or torch.export and check it against PyTorch."""
    from pathlib import Path

    from nin.checkpoint import load_checkpoint
    from nin.export import default_out, export_model, format_result

    model, config = load_checkpoint(args.checkpoint)
    out = Path(args.out) if args.out else default_out(args.checkpoint, args.format)
    result = export_model(model, config, out, args.format, args.force, args.images)
    print(format_result(result))


def cmd_report(args: argparse.Namespace) -> None:
    """Write one self-contained HTML report on a run."""
    from nin.report import write_report

    if args.test_subset is not None and args.test_subset < 1:
        raise NinError(f"--test-subset must be at least 1, got {args.test_subset}")
    path, summary = write_report(
        args.run_dir, args.out, args.data_dir, args.test_subset, args.device, args.force
    )
    print(summary)
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB, self-contained)")


def cmd_serve(args: argparse.Namespace) -> None:
    """Serve the upload-and-classify page on this machine."""
    from nin.predict import load_predictor
    from nin.serve import require_serve_packages, serve

    require_serve_packages()
    if (args.checkpoint is None) == (args.model is None):
        raise NinError("give a CHECKPOINT or --model fashion-mnist (one of them)")
    predictor = load_predictor(args.checkpoint, args.model)
    serve(predictor, args.model or args.checkpoint, args.host, args.port)


def json_object(text: str) -> dict:
    """An argparse type: a JSON object such as '{"batch_norm": false}'."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # not JSON, or nested too deep to parse
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object: {short(text)!r}")
    return value


def add_config_flags(
    parser: argparse.ArgumentParser, *names: str, shown: dict[str, Any] | None = None
) -> None:
    """A flag per TrainConfig field named (default: every one but the preset), with the
    field's help text and, from `shown`, the value it takes when left out."""
    from nin.config import FIELDS, TYPES, flag

    for name, f in FIELDS.items():
        if name == "preset" or (names and name not in names):
            continue
        kind, _ = TYPES[name]
        value = (shown or {}).get(name)
        text = f.metadata["help"] + ("" if value is None else f" (default {value})")
        options = {k: v for k, v in f.metadata.items() if k != "help"}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = json_object if kind is dict else kind
            if "choices" not in options:
                options.setdefault("metavar", {int: "N", float: "X"}.get(kind, name.upper()))
        parser.add_argument(f"--{flag(name)}", help=text.replace("%", "%%"), **options)


def field_defaults() -> dict[str, Any]:
    """Each setting's value where no preset sets it (None: left out)."""
    from nin.config import FIELDS

    return {
        k: f.default
        for k, f in FIELDS.items()
        if k != "preset" and f.default is not None and f.default is not dataclasses.MISSING
    }


def preset_settings() -> str:
    """What each preset sets, and what the rest are under any preset, for `nin train --help`."""
    import textwrap

    from nin.presets import PRESETS

    def line(name: str, settings: dict) -> str:
        pairs = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in settings.items())
        return textwrap.fill(pairs, 78, initial_indent=f"  {name}: ", subsequent_indent="    ",
                             break_on_hyphens=False)  # fmt: skip

    every = set.intersection(*(set(p.settings) for p in PRESETS.values()))  # epochs, lr...
    rest = {k: v for k, v in field_defaults().items() if k not in every}
    lines = ["what each preset sets:"]
    lines += [line(name, preset.settings) for name, preset in PRESETS.items()]
    return "\n".join([*lines, line("any preset, what it does not set", rest)])


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """A model name, and the input size and classes to build it for."""
    parser.add_argument("model", help="a registered model name (see `nin models`)")
    parser.add_argument(
        "--input-size",
        type=int,
        nargs=3,
        metavar=("C", "H", "W"),
        help="the input's channels, height and width (default: the model's own)",
    )
    parser.add_argument("--num-classes", type=int, metavar="N", help="default: the model's")


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line gets one line (no usage block), like every nin error."""

    def error(self, message: str) -> NoReturn:
        """Print the problem and where to read more, then exit with status 2."""
        self.exit(2, f"nin: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = Parser(
        prog="nin", description="Network in Network: build, inspect, train and evaluate NiN."
    )
    parser.add_argument("--version", action="version", version=f"nin {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_model_commands(sub)
    add_training_commands(sub)
    add_shipping_commands(sub)
    return parser


def add_model_commands(sub: Any) -> None:
    """models, summary, resources, download: inspecting models and fetching data."""
    from nin.data import DATASETS

    p = sub.add_parser("models", help="list the registered models")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("summary", help="per-layer output shape, parameters and FLOPs")
    add_model_args(p)
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser(
        "resources",
        help="parameters, FLOPs, training and inference memory (analytic and measured)",
    )
    add_model_args(p)
    p.add_argument(
        "--batch-size", type=int, nargs="+", default=[1, 128], help="one or more (default 1 128)"
    )
    p.add_argument(
        "--optimizer",
        default="sgd",
        choices=["sgd", "momentum", "adam"],
        help="whose state to count: sgd (the chapter's, none), momentum (1×), adam (2×)",
    )
    add_config_flags(p, "device")
    p.set_defaults(func=cmd_resources)

    p = sub.add_parser("download", help="download and verify a data set")
    p.add_argument("dataset", choices=sorted(DATASETS))
    add_config_flags(p, "data_dir")
    p.set_defaults(func=cmd_download)


def add_training_commands(sub: Any) -> None:
    """train, exercises, eval."""
    from nin.config import FIELDS
    from nin.presets import PRESETS

    default = FIELDS["preset"].default
    p = sub.add_parser(
        "train",
        help="train a model; prints the chapter's summary line",
        description="Train NiN. Every option left unset takes the preset's value (or the "
        f"--config file's);\nthe defaults shown are the default preset's ({default}).",
        epilog=preset_settings(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    notes = "; ".join(f"{name}: {preset.note}" for name, preset in PRESETS.items())
    p.add_argument(
        "--preset",
        help=f"{FIELDS['preset'].metadata['help']} (default {default}). {notes}".replace("%", "%%"),
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="start from the settings in a JSON or TOML file (a run's config.json will do); "
        "flags given beside it win",
    )
    add_config_flags(p, shown={**field_defaults(), **PRESETS[default].settings})
    p.add_argument(
        "--scale-lr",
        action="store_true",
        help="with --batch-size: scale the preset's lr by new batch / preset batch (linear rule)",
    )
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a run exactly where its last checkpoint left it (its saved settings)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "exercises",
        help="answer the chapter's exercises with measurements; prints the answers",
        description="Run the chapter's exercises (all by default) and print the answers as "
        "Markdown. The default scale runs on 2 CPU cores in about half an hour; --full is the "
        "chapter's (nin_d2l at 224×224, 10 epochs), for a GPU.",
    )
    p.add_argument("names", nargs="*", help="linear gap tuning pointwise resources reduction")
    p.add_argument("--write", action="store_true", help="save results, README.md, plots in --out")
    p.add_argument("--out", metavar="DIR", help="--write to DIR (default docs/exercises)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per setting (default 3)")
    p.add_argument("--full", action="store_true", help="the chapter's scale (a GPU's work)")
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="run nothing: render README.md and the plots again from the saved results",
    )
    add_config_flags(p, "data_dir", "device")
    p.set_defaults(func=cmd_exercises)

    add_eval_command(sub)


def add_eval_command(sub: Any) -> None:
    """eval: a saved run's test accuracy, overall and per class."""
    p = sub.add_parser("eval", help="test accuracy of a checkpoint, overall and per class")
    p.add_argument("checkpoint", help="a run directory or its model.safetensors")
    add_config_flags(p, "device", "data_dir", "batch_size", "test_subset")
    p.set_defaults(func=cmd_eval)


FORCE_HELP = (
    "replace the file at --out if it is an earlier export or report; never a run's own "
    "files, a directory or a device"
)


def add_out_flags(parser: argparse.ArgumentParser, default: str) -> None:
    """--out (with its default) and --force, for a command that writes one file."""
    parser.add_argument("--out", help=f"default: {default}")
    parser.add_argument("--force", action="store_true", help=FORCE_HELP)


def add_shipping_commands(sub: Any) -> None:
    """predict, export, report, serve: using and shipping a trained model."""
    add_predict_command(sub)
    p = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX (or torch.export), checked against PyTorch",
        description="Write the model as ONNX (needs pip install 'nin[export]') or a "
        "torch.export program, with a dynamic batch dimension; the input is the normalised "
        "float image (the ONNX metadata says how), the output the logits. The file is run "
        "again at batch 1 and 3 and compared with PyTorch.",
    )
    p.add_argument("checkpoint", help="a run directory or its model.safetensors")
    p.add_argument("--format", choices=["onnx", "torch-export"], default="onnx")
    p.add_argument(
        "--images",
        action="store_true",
        help="take uint8 pictures (batch, height, width, channels) of any size: padding, "
        "resizing and normalisation inside the file, as `nin predict` does (no inversion)",
    )
    add_out_flags(p, "model.onnx or model.pt2 in the run directory")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "report",
        help="one self-contained HTML page on a run: curves, confusion, mistakes, config",
        description="Evaluate a run's checkpoint on the test split and write one HTML file "
        "(images inline, no external resources): loss and accuracy curves, the confusion "
        "matrix, per-class accuracy, the most confident mistakes, the config and environment.",
    )
    p.add_argument("run_dir", help="a run directory written by `nin train`")
    add_out_flags(p, "RUN_DIR/report.html")
    add_config_flags(p, "data_dir", "test_subset", "device")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "serve",
        help="a local web page: upload or draw an image, see the top 5 classes",
        description="Serve a page on this machine (needs pip install 'nin[serve]') where you "
        "upload a PNG/JPEG or draw on a canvas and see the top 5 classes with probabilities.",
    )
    p.add_argument("checkpoint", nargs="?", help="a run directory written by `nin train`")
    p.add_argument(
        "--model", metavar="NAME", help="a bundled model (fashion-mnist or cifar10) instead"
    )
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    p.set_defaults(func=cmd_serve)


def add_predict_command(sub: Any) -> None:
    """predict: the top classes of images."""
    p = sub.add_parser(
        "predict",
        help="top classes of PNG/JPEG images with a checkpoint or the bundled model",
        description="Classify PNG/JPEG images (files or folders). Fashion-MNIST images are "
        "light objects centred on a black background: photos of dark objects on a light "
        "background are inverted automatically (--invert/--no-invert to force), and every "
        "image is padded to a square and shrunk to the model's input.",
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="PATH",
        help="CHECKPOINT (a run directory), then PNG/JPEG files or folders; with --model, "
        "images only",
    )
    p.add_argument(
        "--model",
        metavar="NAME",
        help="a bundled model (fashion-mnist or cifar10) instead of a CHECKPOINT",
    )
    p.add_argument("--top-k", type=int, default=5, help="classes to show per image (default 5)")
    p.add_argument(
        "--invert",
        action=argparse.BooleanOptionalAction,
        help="invert light-background images (default: when the border is light)",
    )
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    p.set_defaults(func=cmd_predict)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is: it unwinds and cleans up as after Ctrl-C."""


def on_sigterm(signum: int, frame: Any) -> None:
    """The SIGTERM handler while a command runs."""
    raise Terminated


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` (a KeyboardInterrupt), so temporary files
    go and locks are released as after Ctrl-C; in the main thread only, where signals land."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def short(name: Any, limit: int = 80) -> str:
    """A file name for a message, its middle elided when it is longer than `limit`."""
    text = os.fsdecode(name) if isinstance(name, str | bytes | os.PathLike) else str(name)
    return cut(text, limit)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `nin` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        with sigterm_as_interrupt():
            args.func(args)
    except NinError as e:  # cut short: a message may echo a huge input
        print(f"nin: error: {cut(str(e), MAX_MESSAGE)}", file=sys.stderr)
        return 1
    except OSError as e:  # what no check foresaw (a name over the system's limit...): one line
        where = f"{short(e.filename)}: " if e.filename is not None else ""
        print(f"nin: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except Terminated:
        print("nin: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("nin: interrupted", file=sys.stderr)
        return 130
    return 0
