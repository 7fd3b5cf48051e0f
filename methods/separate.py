"""Fully separate networks (``separate``): task routing at sigma = 0.

The sigma=0 end of Task Routing's sharing axis (Strezoski et al., ICCV 2019, arXiv
1903.12117): every layer's units are partitioned among the tasks, so no unit is used by two
tasks (while tasks <= channels) and the tasks form disjoint sub-networks inside one model
with exactly the parameter count of ``hard`` and ``tr``. It has no sigma option (it sits at
0) and no mask rule (``masks=paper`` at sigma 0 would keep nothing). When tasks outnumber a
layer's channels, units are reused as evenly as possible, so some units are then shared.

Its routed norms keep per-task statistics by default, as ``tr``'s do: every sub-network
after the first layer sees only its own task's data.
"""
from __future__ import annotations

from mtlbench.methods.tr import RoutingOptions, TaskRouting
from mtlbench.registry import register_method


@register_method("separate", "Fully separate sub-networks in one model: task routing with sigma fixed at 0.")
class Separate(TaskRouting):
    options_class = RoutingOptions
    label_options = ()
    fixed_sigma = 0.0
    same_as = ("tr", {"sigma": 0.0})

    @classmethod
    def bench_figures(cls, bench) -> dict:
        return {}  # its implementations are tr's, measured there
