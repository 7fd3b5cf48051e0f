"""What methods cost on a timm backbone: routing's overhead, and the column methods at T=40.

    python tests/benchmarks/timm_costs.py                       # timm:resnet18, batch 32, 32 px
    python tests/benchmarks/timm_costs.py --model mobilenetv3_small_100 --tasks 40

Two parts, on the CPU unless ``--device cuda``:

- ``routing_overhead``: one training step (through the method's own ``train_step``, as
  ``mtlbench run`` takes it) of ``tr`` at σ=0.5 and at σ=1 against ``hard`` on the same
  model, i.e. the same network without routing layers. Taken in turns after 2 warm-up
  steps; the ratio is the median of 7 per-turn ratios.
- ``columns``: ``hard``, ``stl`` and ``cross-stitch`` at ``--tasks`` tasks: median step time
  (5 steps after 2 warm-up) and the process's peak memory over building the model and its
  steps (RSS high-water mark, reset before each method), with the ratios to ``hard``.

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import gc
import json
import os

import torch

from mtlbench.config import RunConfig
from mtlbench.engine import Trainer, build_method
from mtlbench.measure import PeakMemory, median_ratio, time_call, time_turns, tune_allocator
from mtlbench.method import Budget
from mtlbench.registry import METHODS


def setup(model: str, method: str, tasks: int, batch: int, device: str, **options):
    cfg = RunConfig(method=method, tasks=tasks, backbone=f"timm:{model}", batch_size=batch,
                    method_options=METHODS.get(method).resolve_options(options))
    net = build_method(cfg, 3).to(device, memory_format=torch.channels_last)
    net.prepare(torch.device(device))
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch, tasks), device=device).float()
    trainer = Trainer(net, cfg, 100)
    step_tasks, _ = next(iter(net.schedule(Budget(1, 1), torch.Generator().manual_seed(0))))
    return lambda: net.train_step(x, y, step_tasks, trainer)


def routing_overhead(model: str, batch: int, device: str) -> dict:
    steps = {"hard": setup(model, "hard", 2, batch, device),
             "tr_sigma0.5": setup(model, "tr", 2, batch, device, sigma=0.5),
             "tr_sigma1": setup(model, "tr", 2, batch, device, sigma=1.0)}
    times = time_turns(steps, warmup=2, repeats=7, device=device)
    return {"step_ms_median": {k: 1000 * sorted(v)[len(v) // 2] for k, v in times.items()},
            "tr_sigma0.5_over_hard": median_ratio(times, "tr_sigma0.5", "hard"),
            "tr_sigma1_over_hard": median_ratio(times, "tr_sigma1", "hard")}


def columns(model: str, tasks: int, batch: int, device: str) -> dict:
    out = {}
    for method in ("hard", "stl", "cross-stitch"):
        gc.collect()
        with PeakMemory(device) as memory:
            base = _resident_bytes() if device == "cpu" else 0
            step = setup(model, method, tasks, batch, device)
            timing = time_call(step, warmup=2, repeats=5, device=device)
        out[method] = {"step_ms": 1000 * timing["median_s"], "peak_mb": (memory.bytes - base) / 2**20,
                       "memory_how": memory.how + (", minus the resident memory before the build" if base else "")}
        del step
    for method in ("stl", "cross-stitch"):
        out[method]["step_over_hard"] = out[method]["step_ms"] / out["hard"]["step_ms"]
        out[method]["memory_over_hard"] = out[method]["peak_mb"] / out["hard"]["peak_mb"]
    return out


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--tasks", type=int, default=40)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-columns", action="store_true")
    args = p.parse_args()
    tune_allocator()  # as mtlbench run does
    figures = {"model": f"timm:{args.model}", "batch": args.batch, "device": args.device,
               "threads": torch.get_num_threads(),
               "routing_overhead": routing_overhead(args.model, args.batch, args.device)}
    if not args.skip_columns:
        figures[f"columns_T{args.tasks}"] = columns(args.model, args.tasks, args.batch, args.device)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
