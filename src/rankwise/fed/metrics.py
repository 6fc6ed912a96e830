"""The per-round curves of a federated run as one PNG (global quality, client losses, bytes)."""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure


def plot_rounds(metrics_path: Path, png_path: Path) -> None:
    """Validation loss and exact match, each client's train loss, and bytes, per round."""
    lines = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
    rounds = [m["round"] for m in lines]
    fig = Figure(figsize=(12, 3.5))  # no pyplot: the user's matplotlib backend stays as it is
    quality, clients, traffic = fig.subplots(1, 3)
    if any("val_loss" in m for m in lines):
        quality.plot(rounds, [m.get("val_loss") for m in lines], "o-", label="val loss")
    if any("exact_match" in m for m in lines):
        twin = quality.twinx()
        twin.plot(rounds, [m.get("exact_match") for m in lines], "s--", color="C1")
        twin.set_ylabel("exact match")
    quality.set_xlabel("round")
    quality.set_title("global model")
    for k in range(max((len(m["client_losses"]) for m in lines), default=0)):
        points = [(m["round"], m["client_losses"][k]) for m in lines if k < len(m["client_losses"])]
        clients.plot(*zip(*points, strict=True), "o-", label=f"reply {k}")
    clients.set_xlabel("round")
    clients.set_title("client train loss")
    traffic.plot(rounds, [m["uplink_bytes"] for m in lines], "o-", label="uplink")
    traffic.plot(rounds, [m["downlink_bytes"] for m in lines], "s-", label="downlink")
    traffic.set_xlabel("round")
    traffic.set_title("bytes per round")
    traffic.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
