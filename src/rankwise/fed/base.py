"""What every aggregation method shares: client updates, the global state, its error and bytes.

Pure functions over factors, no Flower. One module's update of client k is its factors (A_k
[r_k, in], B_k [out, r_k], and for Fed-SB R_k [r, r]) with the scale s_k; the global model of a
module is W0 + Σ folded B_f A_f + s B R A (R the identity where a method has none). "Folded"
pairs are exact low-rank updates the clients add to their frozen base (FedEx-LoRA's residual,
FLoRA's stacks), kept as factors so the exported adapter is exact and ordinary PEFT LoRA.

Clients are stateless (a deployment starts a fresh client process each round), so the downlink
carries everything a client needs to rebuild the global model: the folded pairs too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from rankwise.errors import RankwiseError

SEP = "|"  # module|part: the flat names that travel (module names hold dots, never a bar)


@dataclass
class ModuleState:
    """One module of the global model: the trained factors and the folded (frozen) pairs."""

    parts: dict[str, torch.Tensor]  # "A" [r, in], "B" [out, r], maybe "R" [r, r]; empty: none
    scale: float
    folded: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (A, B·s)

    def trained_delta(self, zeros: torch.Tensor) -> torch.Tensor:
        """s B R A ([out, in], in the dtype of ``zeros``; zero where nothing trains)."""
        if not self.parts:
            return zeros.clone()
        return self.scale * product({k: v.to(zeros) for k, v in self.parts.items()})

    def folded_delta(self, zeros: torch.Tensor) -> torch.Tensor:
        """Σ B_f A_f over the folded pairs, added to ``zeros`` ([out, in])."""
        total = zeros.clone()
        for a, b in self.folded:
            total += b.to(total) @ a.to(total)
        return total

    def delta(self, zeros: torch.Tensor) -> torch.Tensor:
        """The whole update W - W0 ([out, in], added to ``zeros``)."""
        return self.folded_delta(zeros) + self.trained_delta(zeros)


GlobalState = dict[str, ModuleState]  # module name -> its state


@dataclass
class ClientUpdate:
    """What one client trained this round: its factors per module, its weight (examples)."""

    parts: dict[str, dict[str, torch.Tensor]]  # module -> {"A", "B", maybe "R"} after training
    scales: dict[str, float]  # module -> s_k (alpha / r_k, or alpha / sqrt(r_k))
    weight: float  # number of training examples; normalised to p_k by the server

    def delta(self, module: str, zeros: torch.Tensor) -> torch.Tensor:
        """s_k B_k (R_k) A_k of one module, in the dtype of ``zeros``."""
        parts = {k: v.to(zeros) for k, v in self.parts[module].items()}
        return self.scales[module] * product(parts)


def product(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """B A, or B R A where an R sits between the factors."""
    middle = parts["B"] @ parts["R"] if "R" in parts else parts["B"]
    return middle @ parts["A"]


class Method:
    """An aggregation rule; subclasses say what trains, what travels and how it combines."""

    name: ClassVar[str]
    paper: ClassVar[str]
    exact: ClassVar[bool]  # whether the aggregate equals Σ p_k ΔW_k
    trains: ClassVar[tuple[str, ...]]  # the parts clients train (and send up)

    def aggregate(
        self, state: GlobalState, updates: list[ClientUpdate], weights: list[float]
    ) -> GlobalState:
        """The next global state from this round's updates (``weights`` sum to one)."""
        raise NotImplementedError(f"{type(self).__name__} must define aggregate")

    def restarts(self) -> bool:
        """Whether clients start each round from a fresh adapter on the folded base (FLoRA)."""
        return False

    def downlink(self, state: GlobalState) -> dict[str, torch.Tensor]:
        """What the server sends each client: the trained parts and every folded pair."""
        flat = {}
        for module, ms in state.items():
            for part, tensor in ms.parts.items():
                flat[f"{module}{SEP}{part}"] = tensor
            for i, (a, b) in enumerate(ms.folded):
                flat[f"{module}{SEP}fold{i}.A"] = a
                flat[f"{module}{SEP}fold{i}.B"] = b
        return flat

    def from_uplink(
        self, state: GlobalState, flat: dict[str, torch.Tensor], scale: float, weight: float
    ) -> ClientUpdate:
        """A client's whole update from what it sent: its trained parts over the global ones."""
        sent = unflatten(flat)
        parts = {module: {**ms.parts, **sent[module]} for module, ms in state.items()}
        return ClientUpdate(parts, {module: scale for module in state}, weight)

    def uplink(self, update: ClientUpdate) -> dict[str, torch.Tensor]:
        """What one client sends back: only the parts it trained."""
        return {
            f"{module}{SEP}{part}": parts[part]
            for module, parts in update.parts.items()
            for part in self.trains
        }


def normalised(weights: list[float]) -> list[float]:
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise RankwiseError(f"client weights must be non-negative and not all zero, got {weights}")
    return [w / total for w in weights]


def aggregation_error(
    old: GlobalState, new: GlobalState, updates: list[ClientUpdate], weights: list[float]
) -> float:
    """‖ΔW_agg − Σ p_k ΔW_k‖ / ‖Σ p_k ΔW_k‖ over all modules, updates taken from the round's
    starting global model (a client's model is the old folded base plus its trained factors)."""
    num = den = 0.0
    for module, ms in old.items():
        first = updates[0].parts[module]
        zeros = first["B"].new_zeros(first["B"].shape[0], first["A"].shape[1]).double()
        start = ms.delta(zeros)
        ideal = zeros.clone()
        for update, p in zip(updates, weights, strict=True):
            client = ms.folded_delta(zeros) + update.delta(module, zeros)
            ideal += p * (client - start)
        got = new[module].delta(zeros) - start
        num += float((got - ideal).square().sum())
        den += float(ideal.square().sum())
    return math.sqrt(num) / max(math.sqrt(den), 1e-30)


def npy_bytes(shape: tuple[int, ...], itemsize: int = 4) -> int:
    """Bytes of one fp32 array in NumPy's .npy format (what Flower's ``Array`` holds): the data
    plus the version-1 header, padded to a multiple of 64 bytes."""
    text = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {tuple(shape)!r}, }}"
    header = 10 + len(text) + 1  # magic + version + length, the dict, a newline
    return header + (-header) % 64 + itemsize * math.prod(shape)


def payload_bytes(payload: dict[str, torch.Tensor]) -> int:
    """The analytic size of a payload as Flower's ``ArrayRecord.count_bytes`` counts it: each
    array's .npy bytes plus the length of its key."""
    return sum(npy_bytes(tuple(t.shape)) + len(key) for key, t in payload.items())


def unflatten(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``module|part`` names back into module -> part -> tensor."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        module, _, part = key.rpartition(SEP)
        out.setdefault(module, {})[part] = tensor
    return out


def state_from_flat(flat: dict[str, torch.Tensor], scales: dict[str, float]) -> GlobalState:
    """A ``downlink`` payload back into a global state."""
    state = {}
    for module, parts in unflatten(flat).items():
        folds = sorted({p.split(".")[0] for p in parts if p.startswith("fold")}, key=_fold_index)
        state[module] = ModuleState(
            {k: v for k, v in parts.items() if not k.startswith("fold")},
            scales[module],
            [(parts[f"{f}.A"], parts[f"{f}.B"]) for f in folds],
        )
    return state


def _fold_index(name: str) -> int:
    return int(name.removeprefix("fold"))


def weighted_mean(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    total = torch.zeros_like(tensors[0])
    for tensor, p in zip(tensors, weights, strict=True):
        total += p * tensor
    return total


def same_ranks(updates: list[ClientUpdate], method: str) -> None:
    """Methods that average factors need every client at the same rank per module."""
    for module in updates[0].parts:
        ranks = {u.parts[module]["A"].shape[0] for u in updates}
        if len(ranks) > 1:
            raise RankwiseError(
                f"{method} averages factors, so every client needs the same rank at '{module}' "
                f"(got {sorted(ranks)}); flora stacks mixed ranks"
            )
