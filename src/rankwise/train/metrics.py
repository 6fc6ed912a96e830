"""Training metrics as JSON lines, and the loss curve as a PNG."""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl``."""

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = path
        if resume_step and path.exists():  # forget lines logged after the resumed checkpoint
            kept = [line for line in read_metrics(path) if line["step"] <= resume_step]
            path.write_text("".join(json.dumps(line) + "\n" for line in kept))
        elif not resume_step:
            path.write_text("")

    def write(self, **values: float) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps(values) + "\n")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(metrics_path: Path, png_path: Path) -> None:
    """Training loss (and validation loss where logged) against the step."""
    lines = read_metrics(metrics_path)
    train = [(m["step"], m["loss"]) for m in lines if "loss" in m]
    val = [(m["step"], m["val_loss"]) for m in lines if "val_loss" in m]
    fig = Figure(figsize=(6, 4))  # no pyplot: the user's matplotlib backend stays as it is
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
