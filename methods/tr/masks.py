"""Task routing masks: which units of a layer each task keeps.

Two rules (``-o method.masks=own|paper``):

- ``own`` (the default): units are shuffled and dealt round-robin to the tasks as their own
  units, so every unit is owned by some task and every task owns at least one (units are
  reused as evenly as possible when tasks outnumber units). Each task then also keeps
  ``round(sigma * (units it does not own))`` of the others, at random. sigma=1 gives all ones;
  sigma=0 gives a partition (when tasks <= channels), i.e. separate sub-networks.
- ``paper``: as in the official code, each task independently keeps ``round(sigma * C)`` of a
  layer's C units, chosen at random, sigma being the kept fraction. Units may be kept by no
  task. sigma=0 would keep nothing and is rejected.
"""
from __future__ import annotations

import torch

MASK_RULES = ("own", "paper")


def draw_masks(channels: int, num_tasks: int, sigma: float, generator: torch.Generator,
               rule: str = "own") -> torch.Tensor:
    """Binary ``[num_tasks, channels]`` masks with sharing ratio ``sigma`` under ``rule``."""
    cpu = torch.device("cpu")  # explicit, so models can also be built on the meta device
    masks = torch.zeros(num_tasks, channels, device=cpu)
    if rule == "paper":
        keep = round(sigma * channels)
        for t in range(num_tasks):
            masks[t, torch.randperm(channels, generator=generator, device=cpu)[:keep]] = 1.0
        return masks
    perm = torch.randperm(channels, generator=generator, device=cpu)
    slots = torch.arange(max(channels, num_tasks), device=cpu)
    masks[slots % num_tasks, perm[slots % channels]] = 1.0
    for t in range(num_tasks):
        others = (masks[t] == 0).nonzero().flatten()
        keep = round(sigma * len(others))
        if keep:
            pick = others[torch.randperm(len(others), generator=generator, device=cpu)[:keep]]
            masks[t, pick] = 1.0
    return masks
