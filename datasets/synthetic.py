"""``synthetic``: procedurally generated images with up to 4096 binary tasks (the default).

Source: generated here from a seed; no download and no files. Licence: same as mtlbench.

Each image shows one object on a plain background. Its latent factors are the object's
shape (disk, square, diamond, ring), position (x, y), size, hue, the background brightness,
and a stripe texture's frequency and orientation. These give an 11-dimensional factor
vector z (two balanced shape contrasts, x, y, size, cos and sin of hue, background, stripe
frequency, cos and sin of twice the stripe angle), standardised on a fixed reference sample.
Task t is the binary function ``z · w_t > median``: its threshold is the median score of the
reference sample, so every task has about 50% positives.

Relatedness r in [0, 1] sets how the task directions w_t relate:
``w_t = normalise(sqrt(r) · c + sqrt(1 - r) · v_t)``, where c is one common direction and
v_t an independent one per task; each uses 2 random factors with random signs. At r=1
every task is the same function of the same factors (identical labels); at r=0 each task
uses its own pair of factors, disjoint from or conflicting with most other tasks'. Labels
correlate more strongly as r grows. Factors differ in how easily a CNN reads them (hue and
brightness are easy; shape and stripe orientation are hard), so tasks range from easy to
hard, as real attributes do.

Generation is vectorised: 10,000 32x32 images take a fraction of a second. The same
``data_seed`` gives the same images, labels and tasks; ``train`` and ``test`` draw disjoint
streams from it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mtlbench.data import TaskDataset, check_num_tasks, check_split
from mtlbench.errors import MtlbenchError
from mtlbench.registry import register_dataset

MAX_TASKS = 4096
NUM_FACTORS = 11
FACTORS_PER_TASK = 2


@dataclass
class SyntheticConfig:
    relatedness: float = 0.5
    num_train: int = 10000
    num_test: int = 1000
    image_size: int = 32
    data_seed: int = 0


def _latents(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    u = lambda: torch.rand(n, generator=g)  # noqa: E731
    return {"shape": torch.randint(4, (n,), generator=g), "cx": 0.3 + 0.4 * u(), "cy": 0.3 + 0.4 * u(),
            "size": 0.18 + 0.14 * u(), "hue": u(), "bg": u(), "freq": u(), "angle": math.pi * u()}


def _factors(z: dict[str, torch.Tensor]) -> torch.Tensor:
    """The raw factor vector ``[n, 11]`` the tasks are functions of."""
    hue, ang = 2 * math.pi * z["hue"], 2 * z["angle"]
    # Two balanced shape contrasts: round (disk, ring) vs not; disk or square vs the others.
    round_, simple = (z["shape"] == 0) | (z["shape"] == 3), z["shape"] <= 1
    cols = [round_.float(), simple.float(), z["cx"], z["cy"], z["size"], hue.cos(), hue.sin(), z["bg"],
            z["freq"], ang.cos(), ang.sin()]
    return torch.stack(cols, dim=1)


def _hue_to_rgb(hue: torch.Tensor) -> torch.Tensor:
    k = (hue[:, None] * 6 + torch.tensor([0.0, 4.0, 2.0])) % 6
    return ((k - 3).abs() - 1).clamp(0, 1)  # [n, 3], fully saturated colours


def _inside(shape: int, dx: torch.Tensor, dy: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    if shape == 0:  # disk
        return dx.square() + dy.square() < s.square()
    if shape == 1:  # square
        return torch.maximum(dx.abs(), dy.abs()) < 0.85 * s
    if shape == 2:  # diamond
        return dx.abs() + dy.abs() < 1.2 * s
    return ((dx.square() + dy.square()).sqrt() - s).abs() < 0.35 * s  # ring


def render(z: dict[str, torch.Tensor], size: int, g: torch.Generator) -> torch.Tensor:
    """Draw the objects described by ``z`` -> uint8 images ``[n, 3, size, size]``."""
    n = len(z["cx"])
    grid = (torch.arange(size) + 0.5) / size
    dx = grid.view(1, 1, -1) - z["cx"].view(-1, 1, 1)
    dy = grid.view(1, -1, 1) - z["cy"].view(-1, 1, 1)
    s = z["size"].view(-1, 1, 1)
    inside = torch.empty(n, size, size)
    for k in range(4):  # each image only evaluates its own shape
        idx = (z["shape"] == k).nonzero().flatten()
        inside[idx] = _inside(k, dx[idx], dy[idx], s[idx]).float()
    a = z["angle"].view(-1, 1, 1)
    freq = (2 * math.pi * (1 + 1.5 * z["freq"])).view(-1, 1, 1) / s  # 1 to 2.5 stripes per radius
    stripes = torch.sin(freq * a.cos() * dx + freq * a.sin() * dy).gt_(0).mul_(0.4).add_(0.6)
    colour = _hue_to_rgb(z["hue"]).view(-1, 3, 1, 1) * stripes[:, None]
    bg = (0.15 + 0.5 * z["bg"]).view(-1, 1, 1, 1).expand_as(colour)
    img = torch.lerp(bg, colour, inside[:, None])
    img.add_(0.04 * torch.randn(n, 1, size, size, generator=g))  # luminance noise
    return img.clamp_(0, 1).mul_(255).round_().to(torch.uint8)


def _sparse_directions(n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` random unit vectors, each using ``FACTORS_PER_TASK`` factors with random signs."""
    support = torch.rand(n, NUM_FACTORS, generator=g).argsort(dim=1)[:, :FACTORS_PER_TASK]
    w = torch.zeros(n, NUM_FACTORS).scatter_(1, support, torch.randn(n, FACTORS_PER_TASK, generator=g))
    return w / w.norm(dim=1, keepdim=True)


def task_directions(num_tasks: int, relatedness: float, g: torch.Generator) -> torch.Tensor:
    common = _sparse_directions(1, g)
    own = _sparse_directions(MAX_TASKS, g)[:num_tasks]  # drawn in full: task t never depends on T
    w = math.sqrt(relatedness) * common + math.sqrt(1 - relatedness) * own
    return w / w.norm(dim=1, keepdim=True)


@register_dataset("synthetic", "Generated shapes with latent factors; up to 4096 binary tasks, adjustable relatedness.")
class Synthetic(TaskDataset):
    config_class = SyntheticConfig
    max_tasks = MAX_TASKS
    # Doubling it moves each method's mean balanced accuracy by less than a point (the README
    # has the measurements); half of it does not converge.
    default_budget = {"epochs": 4}
    default_pos_weight = "none"  # about 50% positives: the weight would be about 1
    mean = (0.42, 0.42, 0.42)
    std = (0.22, 0.22, 0.22)

    def __init__(self, root: str | None = None, split: str = "train", num_tasks: int = 40,
                 config: SyntheticConfig | None = None, download: bool = False,
                 task_names: list[str] | None = None) -> None:
        cfg = config or SyntheticConfig()
        check_split(split, self.splits, "synthetic")
        all_names = [f"task{t:04d}" for t in range(MAX_TASKS)]
        if task_names:  # generate up to the highest named task, then pick the named ones
            bad = [n for n in task_names if n not in all_names]
            if bad:
                raise MtlbenchError(f"synthetic has no task {bad[0]!r}; tasks are task0000 ... task{MAX_TASKS - 1:04d}")
            num_tasks = max(all_names.index(n) for n in task_names) + 1
        check_num_tasks(num_tasks, MAX_TASKS, "synthetic")
        if not 0.0 <= cfg.relatedness <= 1.0:
            raise MtlbenchError(f"synthetic: relatedness must be in [0, 1], got {cfg.relatedness}")
        if cfg.image_size < 8 or min(cfg.num_train, cfg.num_test) < 1:
            raise MtlbenchError("synthetic: image_size must be >= 8 and num_train, num_test >= 1")
        self.config = cfg
        # Independent streams: task definitions, reference sample, and each split.
        gen = lambda k: torch.Generator().manual_seed(cfg.data_seed * 10 + k)  # noqa: E731
        ref = _factors(_latents(4096, gen(1)))
        loc, scale = ref.mean(dim=0), ref.std(dim=0)
        directions = task_directions(num_tasks, cfg.relatedness, gen(0))
        thresholds = (((ref - loc) / scale) @ directions.t()).median(dim=0).values
        g = gen(2 if split == "train" else 3)
        z = _latents(cfg.num_train if split == "train" else cfg.num_test, g)
        scores = ((_factors(z) - loc) / scale) @ directions.t()
        self.images = render(z, cfg.image_size, g)
        self.labels = (scores > thresholds).to(torch.uint8)
        self.task_names = all_names[:num_tasks]
        if task_names:
            idx = [all_names.index(n) for n in task_names]
            self.labels, self.task_names = self.labels[:, idx], list(task_names)
        self.split = split
