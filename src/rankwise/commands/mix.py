"""``rankwise mix``: train a mixture of LoRA experts with a router, or inspect where it routes."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from rankwise.commands.options import add_options, parse_options
from rankwise.commands.train import report
from rankwise.data import load_dataset_spec
from rankwise.mixture import MixConfig, load_mixture, train_mixture
from rankwise.mixture.inspect import inspect_mixture, plot_angles, plot_gates
from rankwise.models import ModelOptions
from rankwise.options import option
from rankwise.routers import ROUTERS


@dataclass
class InspectOptions(ModelOptions):
    """``rankwise mix inspect``: which mixture, on which records, drawn where."""

    mixture: str = option("", "a mixture folder written by `rankwise mix train`")
    data: str = option("task:all", "records with a task tag to split the gates by")
    split: str = option("validation", "split of a built-in source")
    examples: int = option(16, "examples per task", within="[1, inf)")
    batch_size: int = option(8, "examples per forward", within="[1, inf)")
    output: str | None = option(None, "folder for the PNGs (unset: MIXTURE/inspect)")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("mix", help="mixtures of LoRA experts: train, inspect")
    verbs = parser.add_subparsers(dest="mix_command", required=True, metavar="VERB")
    train = verbs.add_parser(
        "train",
        help=f"train a mixture (router: {', '.join(ROUTERS)})",
        description="Train a mixture of LoRA experts. Every YAML key is also a flag; "
        f"--router picks one of {', '.join(ROUTERS)}, and each router takes its own settings "
        "(a setting of another router is an error).",
    )
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    add_options(train, MixConfig, positional_config=True)
    train.set_defaults(func=run_train)
    inspect = verbs.add_parser("inspect", help="gate heatmaps per task and layer (PNG)")
    inspect.add_argument("mixture", help="a mixture folder written by `rankwise mix train`")
    add_options(inspect, InspectOptions)
    inspect.set_defaults(func=run_inspect)


def run_train(args: argparse.Namespace) -> None:
    report(train_mixture(parse_options(args), resume=args.resume), "mixture")


def run_inspect(args: argparse.Namespace) -> None:
    options = parse_options(args)
    loaded = options.load()
    mixture = load_mixture(loaded.model, options.mixture)
    records = load_dataset_spec(options.data, split=options.split, n=options.examples).records
    report = inspect_mixture(loaded.model, loaded.tokenizer, mixture, records, options.batch_size)
    folder = Path(options.output or Path(options.mixture) / "inspect")
    for path in plot_gates(report, folder):
        print(f"wrote {path}")
    for task, (expert, times, layers) in report.favourites().items():
        print(f"{task}: leans on expert {expert} (top gate in {times} of {layers} layers)")
    summary = {"gates": report.gates, "favourites": report.favourites()}
    if report.angles_before is not None:
        print(f"wrote {plot_angles(report, folder / 'rotation-angles.png')}")
        per_task = {task: report.contrast(task) for task in report.angles_before}
        for task, value in per_task.items():
            print(f"radargate: {task}: correlation of pair angle with its change {value:+.3f}")
        contrast = report.contrast()
        verdict = "holds" if contrast > 0 else "does not hold"
        print(
            f"radargate: correlation of pair angle with its change under rotation {contrast:+.3f} "
            f"over every task's pairs: the paper's contrastive pattern {verdict} here"
        )
        summary |= {
            "angles_before": report.angles_before,
            "angles_after": report.angles_after,
            "contrast": contrast,
            "contrast_per_task": per_task,
        }
    (folder / "inspect.json").write_text(json.dumps(summary, indent=2))
