"""Where a trained mixture routes: mean gate per expert and layer, split by task, as PNGs.

For RadarGate also the mean angle between every pair of experts' outputs before and after the
rotations. The paper reports the rotations are contrastive: pairs already close are drawn
together, distant ones pushed apart. Here that shows as a positive correlation between a pair's
angle before rotation and the change the rotation makes to it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from transformers import PreTrainedTokenizerBase

from rankwise.data import collate, encode_example
from rankwise.mixture.mixture import Mixture
from rankwise.models import model_device
from rankwise.routers.radargate import RadarGate, pair_angles


@dataclass
class Report:
    """Mean gates [E_l] per task and layer; RadarGate pair angles [E, E] before and after."""

    gates: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    angles_before: list[list[float]] | None = None
    angles_after: list[list[float]] | None = None

    def favourites(self) -> dict[str, tuple[int, int, int]]:
        """Per task: the expert most often on top across layers, how often, and of how many."""
        out = {}
        for task, layers in self.gates.items():
            tops = Counter(max(range(len(g)), key=g.__getitem__) for g in layers.values())
            expert, times = tops.most_common(1)[0]
            out[task] = (expert, times, len(layers))
        return out

    def contrast(self) -> float:
        """Correlation of pair angle before rotation with its change (> 0: contrastive)."""
        before = torch.tensor(self.angles_before)
        change = torch.tensor(self.angles_after) - before
        pairs = torch.triu_indices(*before.shape, offset=1)
        x, y = before[pairs[0], pairs[1]], change[pairs[0], pairs[1]]
        return torch.corrcoef(torch.stack([x, y]))[0, 1].item()


@torch.no_grad()
def inspect_mixture(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    mixture: Mixture,
    records: Sequence[dict],
    batch_size: int = 8,
    seq_len: int = 256,
) -> Report:
    """Run the records (prompt and answer) through the model and average the routers' gates."""
    model.eval()
    device = model_device(model)
    report = Report()
    radar = all(isinstance(r, RadarGate) for r in mixture.routers.values())
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        layer.register_forward_hook(
            lambda mod, args, out, name=name: inputs.update({name: args[0]})
        )
        for name, layer in mixture.layers.items()
    ]
    sums_before, sums_after, batches = 0.0, 0.0, 0
    try:
        for task in dict.fromkeys(r.get("task", "all") for r in records):
            mine = [r for r in records if r.get("task", "all") == task]
            totals: dict[str, torch.Tensor] = {}
            tokens = 0
            for start in range(0, len(mine), batch_size):
                batch = collate(
                    [
                        encode_example(r, tokenizer, seq_len)
                        for r in mine[start : start + batch_size]
                    ],
                    tokenizer.pad_token_id,
                )
                batch = {k: v.to(device) for k, v in batch.items()}
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                keep = batch["attention_mask"].bool()  # (B, T)
                tokens += int(keep.sum())
                for name, router in mixture.routers.items():
                    summed = router.last_gates[keep].float().sum(0)  # (E,)
                    totals[name] = totals.get(name, 0) + summed
                    if radar:
                        layer = mixture.layers[name]
                        before, after = router.expert_views(layer, inputs[name][keep])
                        sums_before = sums_before + pair_angles(before)
                        sums_after = sums_after + pair_angles(after)
                        batches += 1
            report.gates[task] = {n: (t / tokens).tolist() for n, t in totals.items()}
    finally:
        for hook in hooks:
            hook.remove()
    if radar and batches:
        report.angles_before = (sums_before / batches).tolist()
        report.angles_after = (sums_after / batches).tolist()
    return report


def plot_gates(report: Report, folder: Path) -> list[Path]:
    """One heatmap per task (layers x experts), mean gate; returns the PNG paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for task, layers in report.gates.items():
        width = max(len(g) for g in layers.values())
        grid = torch.full((len(layers), width), float("nan"))
        for row, gates in enumerate(layers.values()):
            grid[row, : len(gates)] = torch.tensor(gates)
        fig = Figure(figsize=(2 + 0.25 * width, 1.5 + 0.18 * len(layers)))  # no pyplot
        ax = fig.subplots()
        image = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(layers)), [short(n) for n in layers], fontsize=6)
        ax.set_xlabel("expert")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"mean gate: {task}")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        paths.append(folder / f"gates-{task}.png")
        fig.savefig(paths[-1], dpi=100)
    return paths


def plot_angles(report: Report, path: Path) -> Path:
    """RadarGate: pair angles before rotation, after, and the change, in degrees."""
    before = torch.tensor(report.angles_before).rad2deg()
    after = torch.tensor(report.angles_after).rad2deg()
    fig = Figure(figsize=(11, 3.4))
    axes = fig.subplots(1, 3)
    for ax, grid, title in zip(
        axes, (before, after, after - before), ("before", "after", "change"), strict=True
    ):
        image = ax.imshow(grid.numpy(), cmap="coolwarm" if title == "change" else "viridis")
        ax.set_title(f"pair angle {title} (deg)")
        ax.set_xlabel("expert")
        ax.set_ylabel("expert")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # experts are whole numbers
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def short(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``3.q_proj``."""
    parts = name.split(".")
    return f"{parts[2]}.{parts[-1]}" if len(parts) > 3 and parts[1] == "layers" else name
