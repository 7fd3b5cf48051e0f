"""Task routing's own figures for ``mtlbench bench`` (see :meth:`mtlbench.method.Method.bench_figures`).

- ``compact_speedup``: a ``sample`` training step, dense over compact, at sigma 0.5, 0.25 and
  0.75 (the ``impl=auto`` rule).
- ``compact_over_plain_network``: a compact step over a plain one-task network as wide as the
  channels compact computes (near 1: the routing itself costs little; the speed-up is what the
  kernels give at those widths).
- ``all_task_inference_speedup``: T masked dense passes over each all-task path (eval mode,
  the same weights), and the one ``inference=auto`` picks on this device.
"""
from __future__ import annotations

from mtlbench.methods.tr.compact import PAD


def compact_speedup(bench, sigma: float) -> float:
    """A ``sample`` training step, dense over compact."""
    steps = {impl: bench.train_step(*bench.model("tr", bench.shape.tasks, sigma=sigma, impl=impl))
             for impl in ("dense", "compact")}
    return bench.ratio(steps, "dense", "compact")


def figures(bench) -> dict:
    tasks = bench.shape.tasks
    speedup = {f"{sigma:g}": compact_speedup(bench, sigma) for sigma in (0.5, 0.25, 0.75)}
    cfg, model = bench.model("tr", tasks, sigma=0.5, impl="compact")
    widths = [len(idx) for idx, _ in model.compact.active(0, bench.device, PAD)]
    plain = bench.model("hard", 1, backbone_options={"widths": tuple(widths)})
    over_plain = bench.ratio({"compact": bench.train_step(cfg, model), "plain": bench.train_step(*plain)},
                             "compact", "plain")
    predict = {mode: bench.predict_all(bench.model("tr", tasks, sigma=0.5, impl="dense", inference=mode)[1].eval())
               for mode in ("dense", "loop", "grouped")}
    times = bench.turns(**predict)
    by_mode = {mode: bench.median([a / b for a, b in zip(times["dense"], times[mode])]) for mode in ("loop", "grouped")}
    auto = bench.model("tr", 2, sigma=0.5)[1].inference
    return {"compact_speedup": speedup, "compact_over_plain_network": over_plain,
            "all_task_inference_speedup": by_mode.get(auto, 1.0), "all_task_inference_by_mode": by_mode}
