"""How a ``LowRankExperts`` layer combines its experts: the ``Policy`` contract and the default
weighted sum. DoRA, KaSA, LoLDU, NOLA, the routers and the serving engine's slots are other
policies over the same factors.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rankwise.errors import RankwiseError

# beside a saved adapter: the tensors of ``Policy.state``, keyed "<module>:<name>"
POLICY_STATE = "policy_state.safetensors"

if TYPE_CHECKING:
    from rankwise.adapters.layer import LowRankExperts


class Policy(nn.Module):
    """How a ``LowRankExperts`` layer combines its experts: ``policy(layer, x, gates, y)``.

    Returns y (the base output) plus the low-rank term. ``release`` undoes whatever the policy
    attached outside its layer (a hook on the model, say) when the experts are removed;
    ``held`` keeps tensors derived from weights between inference forwards.
    """

    replaces_base = False  # True: the policy forms the whole output, so the base never runs

    def __init__(self) -> None:
        super().__init__()
        # name -> (key of its sources, value); see ``held``
        self.kept: dict[Hashable, tuple[tuple, Any]] = {}

    def forward(
        self,
        layer: LowRankExperts,
        x: torch.Tensor,
        gates: torch.Tensor | None,
        into: torch.Tensor | None,
    ) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not implement forward")

    def release(self) -> None:
        """Remove what the policy added outside its layer (nothing by default)."""

    def held(self, name: Hashable, make: Callable[[], Any], *sources: torch.Tensor) -> Any:
        """``make()``: formed at every training forward, kept between inference forwards.

        ``sources`` change only through in-place writes (optimizer steps, loading), which bump
        their version, so the kept value is formed again after any of them. It is formed as a
        normal tensor even in inference mode, so a later training forward may still use it
        (FlyLoRA's frozen A).
        """
        if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
            return make()
        key = tuple([(t.data_ptr(), t._version) for t in sources])
        kept = self.kept.get(name)
        if kept is None or kept[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                kept = self.kept[name] = (key, make())
        return kept[1]

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """Parameters the policy adds to the layer's adapter (none by default)."""
        return {}

    def regularisation(self, layer: LowRankExperts) -> torch.Tensor | None:
        """A loss term the method trains with (KaSA's), or None."""
        return None

    def restore(self, layer: LowRankExperts) -> None:
        """Undo what the policy changed in the layer's base weight (nothing by default)."""

    def saved_factors(
        self, layer: LowRankExperts, expert: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) whose s B A is expert ``expert``'s update: what PEFT's format stores."""
        return layer.expert_factors(expert)

    def state(self) -> dict[str, torch.Tensor]:
        """Trained tensors PEFT's format has no place for (LoLDU's, NOLA's), kept beside the
        adapter so that ``--resume`` continues exactly; none by default."""
        return {}

    def merge(self, layer: LowRankExperts, weight: torch.Tensor) -> None:
        """Fold the experts into ``weight`` ([out, in], in place); only fixed combinations can."""
        raise RankwiseError(
            f"cannot merge experts routed by {type(self).__name__}: only a fixed weighted sum "
            "of experts folds into one weight"
        )

    def unmerge(self, layer: LowRankExperts, weight: torch.Tensor) -> None:
        """Undo ``merge`` on ``weight`` in place."""
        raise RankwiseError(f"{type(self).__name__} never merges, so there is nothing to undo")


class WeightedSum(Policy):
    """The default policy: y + sum_e g_e s_e B_e A_e x with gates applied in rank space; the
    second product joins the base output in one ``addmm`` and a bf16 base runs both in bf16
    (``bench/finetune.py speed``, ``bench/lora_forward.py``)."""

    def forward(
        self, layer: LowRankExperts, x: torch.Tensor, gates: torch.Tensor | None, into: torch.Tensor
    ) -> torch.Tensor:
        return layer.gated(x, layer.rank_gate(gates), into)

    def merge(self, layer: LowRankExperts, weight: torch.Tensor) -> None:
        """W += sum_e w_e s_e B_e A_e."""
        weight += layer.delta_weight().to(weight.dtype)

    def unmerge(self, layer: LowRankExperts, weight: torch.Tensor) -> None:
        """W -= the same update, recomputed bit for bit from the factors."""
        weight -= layer.delta_weight().to(weight.dtype)
