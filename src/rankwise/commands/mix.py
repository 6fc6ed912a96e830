"""``rankwise mix``: train a mixture of LoRA experts with a router, or inspect where it routes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rankwise.commands.options import add_model_options
from rankwise.data import load_dataset_spec
from rankwise.mixture import MixConfig, train_mixture
from rankwise.mixture.inspect import inspect_mixture, plot_angles, plot_gates
from rankwise.models import load_model
from rankwise.routers import ROUTERS, load_mixture
from rankwise.train.config import add_config_flags, config_from_args


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("mix", help="mixtures of LoRA experts: train, inspect")
    verbs = parser.add_subparsers(dest="mix_command", required=True, metavar="VERB")
    train = verbs.add_parser(
        "train",
        help=f"train a mixture (router: {', '.join(sorted(ROUTERS))})",
        description="Train a mixture. Every YAML key is also a flag: --router smora etc.",
    )
    train.add_argument("config", nargs="?", default=None, help="YAML file of mixture settings")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    add_config_flags(train, MixConfig)
    train.set_defaults(func=run_train)
    inspect = verbs.add_parser("inspect", help="gate heatmaps per task and layer (PNG)")
    inspect.add_argument("mixture", help="a mixture folder written by `rankwise mix train`")
    add_model_options(inspect)
    inspect.add_argument("--data", default="task:all", help="records with a task tag to split by")
    inspect.add_argument("--split", default="validation", help="split of a built-in source")
    inspect.add_argument("--examples", type=int, default=16, help="examples per task")
    inspect.add_argument("--batch-size", type=int, default=8)
    inspect.add_argument("--output", default=None, help="folder for PNGs (default MIXTURE/inspect)")
    inspect.set_defaults(func=run_inspect)


def run_train(args: argparse.Namespace) -> None:
    result = train_mixture(config_from_args(args, MixConfig), resume=args.resume)
    val = f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    print(
        f"trained {result.steps} steps in {result.seconds:.0f}s "
        f"({result.tokens_per_second:.0f} tokens/s): loss {result.final_loss:.4f}{val}; "
        f"mixture written to {result.adapter_dir}"
    )


def run_inspect(args: argparse.Namespace) -> None:
    loaded = load_model(args.model, args.dtype)
    mixture = load_mixture(loaded.model, args.mixture)
    records = load_dataset_spec(args.data, split=args.split, n=args.examples).records
    report = inspect_mixture(loaded.model, loaded.tokenizer, mixture, records, args.batch_size)
    folder = Path(args.output or Path(args.mixture) / "inspect")
    for path in plot_gates(report, folder):
        print(f"wrote {path}")
    for task, (expert, times, layers) in report.favourites().items():
        print(f"{task}: leans on expert {expert} (top gate in {times} of {layers} layers)")
    summary = {"gates": report.gates, "favourites": report.favourites()}
    if report.angles_before is not None:
        print(f"wrote {plot_angles(report, folder / 'rotation-angles.png')}")
        contrast = report.contrast()
        verdict = "holds" if contrast > 0 else "does not hold"
        print(
            f"radargate: correlation of pair angle with its change under rotation {contrast:+.3f}: "
            f"the paper's contrastive pattern {verdict} here"
        )
        summary |= {
            "angles_before": report.angles_before,
            "angles_after": report.angles_after,
            "contrast": contrast,
        }
    (folder / "inspect.json").write_text(json.dumps(summary, indent=2))
