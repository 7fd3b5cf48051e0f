"""Fully separate networks (``separate``): task routing at sigma = 0.

The sigma=0 end of Task Routing's sharing axis (Strezoski et al., ICCV 2019, arXiv
1903.12117): every layer's units are partitioned among the tasks, so no unit is used by two
tasks (while tasks <= channels) and the tasks form disjoint sub-networks inside one model
with exactly the parameter count of ``hard`` and ``tr``. Its sigma is fixed at 0 whatever
``--sigma`` says. When tasks outnumber a layer's channels, units are reused as evenly as
possible, so some units are then shared.
"""
from __future__ import annotations

import dataclasses

from mtlbench.backbones import BackboneSpec
from mtlbench.method import MethodConfig
from mtlbench.registry import register_method
from mtlbench.methods.tr import TaskRouting


@register_method("separate", "Fully separate sub-networks in one model: task routing with sigma fixed at 0.")
class Separate(TaskRouting):
    uses_sigma = False
    fixed_sigma = 0.0

    def __init__(self, backbone: BackboneSpec, num_tasks: int, config: MethodConfig, seed: int = 0) -> None:
        super().__init__(backbone, num_tasks, dataclasses.replace(config, sigma=0.0), seed)
