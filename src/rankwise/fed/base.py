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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from rankwise.errors import RankwiseError

if TYPE_CHECKING:
    from rankwise.adapters import LoraConfig
    from rankwise.fed.config import FedConfig

Scores = Callable[[], dict[str, float]]  # module -> importance, measured on demand (a gradient)

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

    def whole(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every pair of the module as folded (A, B·s) pairs, the trained factors included."""
        if not self.parts:
            return list(self.folded)
        middle = self.parts["B"] @ self.parts["R"] if "R" in self.parts else self.parts["B"]
        return [*self.folded, (self.parts["A"], self.scale * middle)]

    def truncated(self, rank: int) -> ModuleState:
        """The module as a client of rank ``rank`` receives it: the first ``rank`` rows of A,
        columns of B (and block of R); the same module where the rank is the global one."""
        cut = {"A": (slice(rank),), "B": (slice(None), slice(rank)), "R": (slice(rank),) * 2}
        return ModuleState(
            {k: v[cut[k]] for k, v in self.parts.items()}, self.scale, list(self.folded)
        )


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
        """The next global state from this round's updates (``weights`` sum to one): by default
        each trained part is the clients' weighted mean and the frozen parts and folded pairs stay
        (exact when one factor trains, as in FFA and Fed-SB; FedIT's inexact average when both)."""
        return {
            module: ModuleState(
                {
                    part: weighted_mean([u.parts[module][part] for u in updates], weights)
                    if part in self.trains
                    else kept
                    for part, kept in ms.parts.items()
                },
                ms.scale,
                list(ms.folded),
            )
            for module, ms in state.items()
        }

    def restarts(self) -> bool:
        """Whether clients start each round from a fresh adapter on the folded base (FLoRA)."""
        return False

    def global_lora(self, config: FedConfig, modules: list[str]) -> LoraConfig:
        """The global adapter on the targeted ``modules``: the run's LoRA settings (legend sets a
        rank per module)."""
        return config.lora()

    def local_lora(
        self, config: FedConfig, partition_id: int, modules: list[str], scores: Scores
    ) -> LoraConfig:
        """What client ``partition_id`` trains this round (``config`` is its local run's, rank
        included): every module; hello and legend choose modules and ranks per client."""
        return config.lora()

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
        """A client's whole update from what it sent: its trained parts over the global ones, for
        the modules it trained (every module, but under hello and legend)."""
        sent = unflatten(flat)
        parts = {module: {**state[module].parts, **mine} for module, mine in sent.items()}
        return ClientUpdate(parts, {module: scale for module in parts}, weight)

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
    """‖ΔW_agg − Σ p_k ΔW_k‖ / ‖Σ p_k ΔW_k‖ over all modules. A module's mean runs over the clients
    that trained it (p_k renormalised over them; every client, but under hello and legend), and
    ΔW_k is client k's model minus the global model as it received it (the old folded base plus
    the old factors, truncated to its rank under legend)."""
    num = den = 0.0
    for module, ms in old.items():
        held = [(u, p) for u, p in zip(updates, weights, strict=True) if module in u.parts]
        if not held:
            continue
        total = sum(p for _, p in held)
        first = held[0][0].parts[module]
        zeros = first["B"].new_zeros(first["B"].shape[0], first["A"].shape[1]).double()
        start = ms.delta(zeros)
        ideal = zeros.clone()
        for update, p in held:
            received = ms.truncated(update.parts[module]["A"].shape[0]).delta(zeros)
            client = ms.folded_delta(zeros) + update.delta(module, zeros)
            ideal += p / total * (client - received)
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


def held_mean(state: GlobalState, updates: list[ClientUpdate], weights: list[float]) -> GlobalState:
    """Each module's A and B averaged rank row by rank row over the clients that trained that
    row (p_k renormalised over them); rows nobody trained keep their global value.

    A client of rank r_k on a module holds the first r_k rows of A and columns of B; a module a
    client did not train is absent from its update. This is the zero-padding average with the
    padding left out of the denominator (HetLoRA's and LEGEND's rule): a low-rank client does
    not shrink the rows it never had.
    """
    new = {}
    for module, ms in state.items():
        a, b = ms.parts["A"], ms.parts["B"]  # [R, in], [out, R]
        a_sum, b_sum = torch.zeros_like(a), torch.zeros_like(b)
        held = torch.zeros(a.shape[0], dtype=a.dtype, device=a.device)  # [R] weight per row
        for update, p in zip(updates, weights, strict=True):
            if module in update.parts:
                mine = update.parts[module]
                rank = mine["A"].shape[0]
                a_sum[:rank] += p * mine["A"].to(a)
                b_sum[:, :rank] += p * mine["B"].to(b)
                held[:rank] += p
        kept = held > 0
        a_new, b_new = a.clone(), b.clone()
        a_new[kept] = a_sum[kept] / held[kept, None]
        b_new[:, kept] = b_sum[:, kept] / held[kept]
        new[module] = ModuleState({"A": a_new, "B": b_new}, ms.scale, list(ms.folded))
    return new


def same_ranks(updates: list[ClientUpdate], method: str) -> None:
    """Methods that average factors need every client at the same rank per module."""
    for module in updates[0].parts:
        ranks = {u.parts[module]["A"].shape[0] for u in updates}
        if len(ranks) > 1:
            raise RankwiseError(
                f"{method} averages factors, so every client needs the same rank at '{module}' "
                f"(got {sorted(ranks)}); flora stacks mixed ranks"
            )
