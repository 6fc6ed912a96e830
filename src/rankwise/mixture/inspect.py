"""Where a trained mixture routes: mean gate per expert and layer, split by task, as PNGs.

For RadarGate also the mean angle between every pair of experts' outputs before and after the
rotations, per task and layer. The paper reports the rotations are contrastive: pairs already
close are drawn together, distant ones pushed apart. Here that shows as a positive correlation,
over every layer's pairs, between a pair's angle before rotation and the change the rotation
makes to it (the pair's outputs are those of one layer's experts: expert i of one layer has no
relation to expert i of another, so pairs are never averaged over layers).
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

Angles = dict[str, dict[str, list[list[float]]]]  # task -> layer -> [E, E] mean pair angle


@dataclass
class Report:
    """Mean gates [E_l] per task and layer; RadarGate pair angles [E, E] per task and layer,
    before and after the rotations (radians)."""

    gates: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    angles_before: Angles | None = None
    angles_after: Angles | None = None

    def favourites(self) -> dict[str, tuple[int, int, int]]:
        """Per task: the expert most often on top across layers, how often, and of how many."""
        out = {}
        for task, layers in self.gates.items():
            tops = Counter(max(range(len(g)), key=g.__getitem__) for g in layers.values())
            expert, times = tops.most_common(1)[0]
            out[task] = (expert, times, len(layers))
        return out

    def pairs(self, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer's pair angles before rotation and their changes, one point per pair."""
        before, change = [], []
        for layer, grid in self.angles_before[task].items():
            b = torch.tensor(grid)
            upper = torch.triu_indices(*b.shape, offset=1)
            before.append(b[upper[0], upper[1]])
            change.append((torch.tensor(self.angles_after[task][layer]) - b)[upper[0], upper[1]])
        return torch.cat(before), torch.cat(change)

    def contrast(self, task: str | None = None) -> float:
        """Correlation of pair angle before rotation with its change (> 0: contrastive), over
        one task's points or (None) every task's; nan where there is no spread."""
        tasks = [task] if task is not None else list(self.angles_before)
        points = [self.pairs(t) for t in tasks]
        x, y = torch.cat([p[0] for p in points]), torch.cat([p[1] for p in points])
        if x.numel() < 2 or x.std() == 0 or y.std() == 0:
            return float("nan")
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
    before: dict[str, dict[str, torch.Tensor]] = {}
    after: dict[str, dict[str, torch.Tensor]] = {}
    try:
        for task in dict.fromkeys(r.get("task", "all") for r in records):
            mine = [r for r in records if r.get("task", "all") == task]
            totals: dict[str, torch.Tensor] = {}
            tokens = batches = 0
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
                batches += 1
                for name, router in mixture.routers.items():
                    summed = router.last_gates[keep].float().sum(0)  # (E,)
                    totals[name] = totals.get(name, 0) + summed
                    if radar:
                        views = router.expert_views(mixture.layers[name], inputs[name][keep])
                        for store, view in zip((before, after), views, strict=True):
                            grids = store.setdefault(task, {})
                            grids[name] = grids.get(name, 0) + pair_angles(view)
            report.gates[task] = {n: (t / tokens).tolist() for n, t in totals.items()}
            for store in (before, after) if radar else ():
                store[task] = {n: (a / batches).tolist() for n, a in store[task].items()}
    finally:
        for hook in hooks:
            hook.remove()
    if radar and before:
        report.angles_before, report.angles_after = before, after
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
    """RadarGate: per task, every layer's pair angles before rotation against their change
    (degrees), with the correlation; and the mean change per pair over layers and tasks."""
    tasks = list(report.angles_before)
    fig = Figure(figsize=(11, 4))  # no pyplot
    scatter, grid = fig.subplots(1, 2, width_ratios=[3, 2])
    for task in tasks:
        x, y = (t.rad2deg() for t in report.pairs(task))
        scatter.scatter(x, y, s=6, alpha=0.5, label=f"{task} (r = {report.contrast(task):+.2f})")
    scatter.axhline(0, color="grey", linewidth=0.8)
    scatter.set_xlabel("pair angle before rotation (deg)")
    scatter.set_ylabel("change under rotation (deg)")
    scatter.set_title(f"contrast: r = {report.contrast():+.2f} over all pairs")
    scatter.legend(fontsize=6, markerscale=2)
    change = torch.stack(
        [
            torch.tensor(report.angles_after[t][n]) - torch.tensor(g)
            for t in tasks
            for n, g in report.angles_before[t].items()
        ]
    ).mean(0)
    change = change.rad2deg()
    bound = max(change.abs().max().item(), 1e-6)  # white at zero: no change
    image = grid.imshow(change.numpy(), cmap="coolwarm", vmin=-bound, vmax=bound)
    grid.set_title("mean change per pair (deg)")
    grid.set_xlabel("expert")
    grid.set_ylabel("expert")
    grid.xaxis.set_major_locator(MaxNLocator(integer=True))  # experts are whole numbers
    grid.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=grid)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def short(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``3.q_proj``."""
    parts = name.split(".")
    return f"{parts[2]}.{parts[-1]}" if len(parts) > 3 and parts[1] == "layers" else name
