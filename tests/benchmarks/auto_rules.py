"""The figures behind the per-device ``auto`` rules, as one JSON object.

    python tests/benchmarks/auto_rules.py --device cuda      # or cpu (slower: minutes)

- ``tr_compact_speedup``: dense over compact ``tr`` training step by sigma, T=40, batch 64
  and 256 (``mtlbench.methods.tr.AUTO_MAX_KEPT``);
- ``columns_grouped_speedup``: loop over grouped columns at T=10 and 40
  (``mtlbench.methods.columns.AUTO_COLUMNS``);
- ``group_budget``: time and peak memory of tr's and stl's grouped all-task inference at
  several activation budgets, sigma 0.5, T=40 (``mtlbench.layers.GROUP_BYTES``).

Timings follow ``mtlbench bench``: 2 warm-up calls, the median of 7 repeats. Peak memory is
measured on CUDA only (the allocator's peak above what was allocated before the call).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from mtlbench import layers
from mtlbench.bench import Bench, BenchShape
from mtlbench.registry import METHODS
from mtlbench.methods.tr.bench import compact_speedup


def peak_mb(device: torch.device, fn) -> float | None:
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


@torch.no_grad()
def group_budget(device: str, batch: int, budgets_mib: tuple[int, ...]) -> dict:
    b = Bench(device, BenchShape(batch=batch, repeats=7))
    kind, saved = b.device.type, dict(layers.GROUP_BYTES)
    out = {}
    try:
        for mib in budgets_mib:
            layers.GROUP_BYTES[kind] = mib << 20
            row = {}
            for name, method, changes in (("tr", "tr", dict(sigma=0.5, impl="dense")),
                                          ("stl", "stl", dict(columns="grouped"))):
                _, model = b.model(method, 40, **changes)
                model.eval()
                row[f"{name}_s"] = b.timed(lambda: model.predict_all(b.x))
                row[f"{name}_peak_mb"] = peak_mb(b.device, lambda: model.predict_all(b.x))
            out[f"{mib}MiB"] = row
    finally:
        layers.GROUP_BYTES.update(saved)
    _, loop = b.model("stl", 40, columns="loop")
    _, dense = b.model("tr", 40, sigma=0.5, impl="dense", inference="dense")
    loop.eval(), dense.eval()
    out["stl_loop_s"] = b.timed(lambda: loop.predict_all(b.x))
    out["tr_masked_passes_s"] = b.timed(lambda: dense.predict_all(b.x))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    start = time.perf_counter()
    out = {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
           "torch": torch.__version__}
    for batch, sigmas in ((64, (0.0, 0.25, 0.5, 0.75, 0.9)), (256, (0.25, 0.5, 0.75))):
        b = Bench(args.device, BenchShape(batch=batch, repeats=7))
        out[f"tr_compact_speedup_b{batch}"] = {f"{s:g}": compact_speedup(b, s) for s in sigmas}
    for t in (10, 40):
        b = Bench(args.device, BenchShape(cross_stitch_tasks=(t,), repeats=7))
        out[f"columns_grouped_speedup_T{t}"] = {
            **METHODS.get("cross-stitch").bench_figures(b)["columns_grouped_speedup"],
            **METHODS.get("stl").bench_figures(b)["columns_grouped_speedup"]}
    for batch in (64, 250):
        out[f"group_budget_b{batch}"] = group_budget(args.device, batch, (64, 256, 1024, 4096))
    out["seconds"] = time.perf_counter() - start
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
