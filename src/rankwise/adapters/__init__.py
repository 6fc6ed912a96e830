"""Low-rank experts: the layer, injection into a model, init schemes and PEFT's file format."""

from rankwise.adapters.attach import (
    attach_adapters,
    check_compatible,
    copy_factors,
    load_adapter,
    save_adapter,
    weights_from_model,
)
from rankwise.adapters.inject import (
    LoraConfig,
    count_parameters,
    describe_trainable,
    expert_layers,
    inject_adapter,
    inject_experts,
    merge_experts,
    remove_experts,
    select_targets,
    unmerge_experts,
)
from rankwise.adapters.layer import ExpertSpec, LowRankExperts
from rankwise.adapters.peft_format import LoraWeights, read_adapter, write_adapter

__all__ = [
    "ExpertSpec",
    "LoraConfig",
    "LoraWeights",
    "LowRankExperts",
    "attach_adapters",
    "check_compatible",
    "copy_factors",
    "count_parameters",
    "describe_trainable",
    "expert_layers",
    "inject_adapter",
    "inject_experts",
    "load_adapter",
    "merge_experts",
    "read_adapter",
    "remove_experts",
    "save_adapter",
    "select_targets",
    "unmerge_experts",
    "weights_from_model",
    "write_adapter",
]
