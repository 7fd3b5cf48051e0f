"""``mtlbench bench``: speed figures as ratios against references measured in the same process.

Every figure: warm-up, then at least 5 timed repeats (``--quick`` uses smaller shapes and 3
repeats, for tests), on one device, with the thread count recorded. A figure and its
reference are timed in turns (see :func:`mtlbench.measure.time_turns`) and a ratio is the
median of the per-turn ratios.
"""
from __future__ import annotations

import dataclasses
import statistics

import torch

from mtlbench.compact import PAD
from mtlbench.config import RunConfig
from mtlbench.data import Batches
from mtlbench.engine import build_method, make_optimizer, method_flops, task_loss, tf32
from mtlbench.measure import median_ratio, time_call, time_turns, tune_allocator
from mtlbench.results import environment


@dataclasses.dataclass
class BenchShape:
    tasks: int = 40
    batch: int = 64
    size: int = 32
    matmul: int = 2048
    repeats: int = 5
    cross_stitch_tasks: tuple[int, ...] = (10, 40)


QUICK = BenchShape(tasks=4, batch=16, size=16, matmul=512, repeats=3, cross_stitch_tasks=(2, 4))


class Bench:
    def __init__(self, device: str = "cpu", shape: BenchShape | None = None) -> None:
        self.device, self.shape = torch.device(device), shape or BenchShape()
        self.kept_heap = tune_allocator()
        self.x = torch.randn(self.shape.batch, 3, self.shape.size, self.shape.size, device=self.device)
        self.x = self.x.contiguous(memory_format=torch.channels_last)

    def timed(self, fn) -> float:
        return time_call(fn, warmup=2, repeats=self.shape.repeats, device=str(self.device))["median_s"]

    def turns(self, **fns) -> dict[str, list[float]]:
        return time_turns(fns, warmup=2, repeats=self.shape.repeats, device=str(self.device))

    def predict_all(self, model) -> callable:
        return torch.no_grad()(lambda: model.predict_all(self.x))

    def model(self, method: str, tasks: int, **changes):
        cfg = RunConfig(method=method, tasks=tasks, device=str(self.device), **changes)
        model = build_method(cfg, 3).to(self.device, memory_format=torch.channels_last)
        model.prepare(self.device)
        return cfg, model

    def train_step(self, cfg: RunConfig, model) -> callable:
        opt = make_optimizer(model, cfg)
        y = torch.randint(0, 2, (self.shape.batch, cfg.tasks), device=self.device)
        schedule = iter(model.schedule(10_000, torch.Generator().manual_seed(0)))

        def step():
            tasks = next(schedule)
            opt.zero_grad(set_to_none=True)
            task_loss(model(self.x, tasks), y[:, tasks]).backward()
            opt.step()
        return step

    def ceiling_and_train(self) -> dict[str, float]:
        """A large matmul (the ceiling) and a training step of the default backbone under
        ``hard``, in turns: GFLOP/s of each and the step's fraction of the ceiling."""
        n = self.shape.matmul
        a, b = (torch.randn(n, n, device=self.device) for _ in range(2))
        cfg, model = self.model("hard", self.shape.tasks, sigma=1.0, schedule="all")
        flops = method_flops(cfg, (3, self.shape.size, self.shape.size))["train_per_pair"]
        step_flops, matmul_flops = flops * self.shape.batch * self.shape.tasks, 2 * n ** 3
        t = self.turns(matmul=lambda: a @ b, train=self.train_step(cfg, model))
        return {"ceiling_gflops": matmul_flops / statistics.median(t["matmul"]) / 1e9,
                "train_gflops": step_flops / statistics.median(t["train"]) / 1e9,
                "train_fraction_of_ceiling": step_flops / matmul_flops * median_ratio(t, "matmul", "train")}

    def tr_compact_speedup(self, sigma: float) -> float:
        steps = {}
        for impl in ("dense", "compact"):
            cfg, model = self.model("tr", self.shape.tasks, sigma=sigma, schedule="sample", tr_impl=impl)
            steps[impl] = self.train_step(cfg, model)
        return median_ratio(self.turns(**steps), "dense", "compact")

    def tr_compact_over_plain_network(self, sigma: float = 0.5) -> float:
        """A compact ``tr`` step over a plain one-task network as wide as what compact computes.

        Near 1, routing itself (gathers, scatters, statistics bookkeeping) costs little and the
        speed-up is what the kernels give at those channel counts.
        """
        cfg, model = self.model("tr", self.shape.tasks, sigma=sigma, schedule="sample", tr_impl="compact")
        widths = [len(idx) for idx, _ in model.compact.active(0, self.device, PAD)]
        plain_cfg, plain = self.model("hard", 1, sigma=1.0, schedule="all", backbone_options={"widths": tuple(widths)})
        t = self.turns(compact=self.train_step(cfg, model), plain=self.train_step(plain_cfg, plain))
        return median_ratio(t, "compact", "plain")

    def tr_all_task_inference(self, sigma: float = 0.5) -> dict[str, float]:
        """T masked dense passes over each all-task path (eval mode, the same weights)."""
        predict = {}
        for mode in ("dense", "loop", "grouped"):
            _, model = self.model("tr", self.shape.tasks, sigma=sigma, schedule="sample", tr_impl="dense",
                                  method_options={"inference": mode})
            predict[mode] = self.predict_all(model.eval())
        t = self.turns(**predict)
        return {mode: median_ratio(t, "dense", mode) for mode in ("loop", "grouped")}

    def cross_stitch_step_s_per_task(self) -> dict[str, float]:
        steps = {}
        for tasks in self.shape.cross_stitch_tasks:
            cfg, model = self.model("cross-stitch", tasks, sigma=None, schedule="all")
            steps[str(tasks)] = self.train_step(cfg, model)
        t = self.turns(**steps)
        return {tasks: statistics.median(t[tasks]) / int(tasks) for tasks in steps}

    def columns_grouped_speedup(self) -> dict[str, float]:
        """Loop over grouped, for the decision in mtlbench.columns.AUTO_COLUMNS (>1: grouped wins)."""
        tasks = self.shape.cross_stitch_tasks[0]
        step, predict = {}, {}
        for impl in ("loop", "grouped"):
            cfg, model = self.model("cross-stitch", tasks, sigma=None, schedule="all", method_options={"columns": impl})
            step[impl] = self.train_step(cfg, model)
            _, model = self.model("stl", tasks, sigma=None, schedule="all", method_options={"columns": impl})
            predict[impl] = self.predict_all(model.eval())
        return {f"{what}_T{tasks}": median_ratio(self.turns(**fns), "loop", "grouped")
                for what, fns in (("cross_stitch_step", step), ("stl_all_task_inference", predict))}

    def data_fraction_of_step(self) -> float:
        """Batch slicing and normalisation time over one default ``tr`` training step."""
        n = 10_000
        images = torch.randint(0, 256, (n, 3, self.shape.size, self.shape.size), dtype=torch.uint8,
                               device=self.device)
        labels = torch.randint(0, 2, (n, self.shape.tasks), dtype=torch.uint8, device=self.device)
        batches = Batches(images, labels, self.shape.batch, 0, (0.5,) * 3, (0.25,) * 3)
        k = iter(range(10 ** 9))
        cfg, model = self.model("tr", self.shape.tasks, sigma=0.5, schedule="sample")
        t = self.turns(data=lambda: batches.get(next(k)), step=self.train_step(cfg, model))
        return median_ratio(t, "data", "step")

    def run(self) -> dict:
        inference = self.tr_all_task_inference(0.5)
        _, model = self.model("tr", 2, sigma=0.5, schedule="sample")
        default_inference = model.inference  # what "auto" picks on this device
        return {
            **self.ceiling_and_train(),
            "tr_compact_speedup": {f"{s:g}": self.tr_compact_speedup(s) for s in (0.5, 0.25, 0.75)},
            "tr_compact_over_plain_network": self.tr_compact_over_plain_network(0.5),
            "tr_all_task_inference_speedup": inference[default_inference],
            "tr_all_task_inference_by_mode": inference,
            "cross_stitch_step_s_per_task": self.cross_stitch_step_s_per_task(),
            "columns_grouped_speedup": self.columns_grouped_speedup(),
            "data_fraction_of_step": self.data_fraction_of_step(),
            "setting": {**dataclasses.asdict(self.shape), "device": str(self.device),
                        "threads": torch.get_num_threads(), "memory_format": "channels_last",
                        "backbone": "convnet (default)", "tf32": tf32(self.device),
                        "allocator": "freed memory kept" if self.kept_heap else "default",
                        "timing": "figure and reference in turns after 2 warm-up calls; median of per-turn ratios"},
            "environment": environment(),
        }


def render(figures: dict) -> str:
    s = figures["setting"]
    rows = [
        ("ceiling_gflops", f"{figures['ceiling_gflops']:.1f}", f"{s['matmul']}x{s['matmul']} fp32 matmul"),
        ("train_gflops", f"{figures['train_gflops']:.1f}", f"hard, T={s['tasks']}, batch {s['batch']}, {s['size']}px"),
        ("train_fraction_of_ceiling", f"{figures['train_fraction_of_ceiling']:.2f}", "target >= 0.75"),
    ]
    for sigma, v in figures["tr_compact_speedup"].items():
        rows.append((f"tr_compact_speedup[{sigma}]", f"{v:.2f}x", f"training step, dense/compact, T={s['tasks']}"))
    rows.append(("tr_compact_over_plain_network", f"{figures['tr_compact_over_plain_network']:.2f}x",
                 "sigma 0.5: compact step / plain network of the computed widths (1 = no routing overhead)"))
    rows.append(("tr_all_task_inference_speedup", f"{figures['tr_all_task_inference_speedup']:.2f}x",
                 f"sigma 0.5, T={s['tasks']}: T masked passes / all-task path (auto)"))
    for mode, v in figures["tr_all_task_inference_by_mode"].items():
        rows.append((f"  by mode [{mode}]", f"{v:.2f}x", "the same ratio for each all-task mode"))
    for t, v in figures["cross_stitch_step_s_per_task"].items():
        rows.append((f"cross_stitch_step_s_per_task[{t}]", f"{v * 1000:.1f} ms", "training step time / T"))
    for what, v in figures["columns_grouped_speedup"].items():
        rows.append((f"columns_grouped_speedup[{what}]", f"{v:.2f}x", "loop / grouped columns (>1: grouped wins)"))
    rows.append(("data_fraction_of_step", f"{figures['data_fraction_of_step']:.4f}", "target < 0.05"))
    width = max(len(r[0]) for r in rows)
    head = f"device {s['device']}, {s['threads']} threads; {s['timing']}"
    return "\n".join([head] + [f"{a:<{width}}  {b:>10}  {c}" for a, b, c in rows])
