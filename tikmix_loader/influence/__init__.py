"""Group Influence: how much each data domain helps each target set, from projected per-domain gradients."""

from tikmix_loader.influence.config import InfluenceConfig
from tikmix_loader.influence.group_influence import GroupInfluence
from tikmix_loader.influence.matrix import InfluenceMatrix
from tikmix_loader.influence.preconditioners import PRECONDITIONERS, get_preconditioner
from tikmix_loader.influence.task import CausalLMTask, HFCausalLMTask, Task

__all__ = [
    "CausalLMTask",
    "GroupInfluence",
    "HFCausalLMTask",
    "InfluenceConfig",
    "InfluenceMatrix",
    "PRECONDITIONERS",
    "Task",
    "get_preconditioner",
]
assert __all__ == sorted(__all__), "keep __all__ sorted"
