"""``mtlbench bench``: speed figures as ratios against references measured in the same process.

Every figure: warm-up, then at least 5 timed repeats (``--quick`` uses smaller shapes and 3
repeats, for tests), on one device, with the thread count recorded. A figure and its
reference are timed in turns (see :func:`mtlbench.measure.time_turns`) and a ratio is the
median of the per-turn ratios.

Generic figures are measured here; each registered method adds the figures of its own
implementations through :meth:`mtlbench.method.Method.bench_figures`, using this class's
helpers (models, training steps through the method's own ``train_step``, timing in turns).
"""
from __future__ import annotations

import dataclasses
import statistics

import torch
import torch.nn.functional as F

from mtlbench.config import RunConfig
from mtlbench.data import Batches
from mtlbench.engine import Trainer, build_method, method_flops, tf32
from mtlbench.measure import median_ratio, time_call, time_turns, tune_allocator
from mtlbench.method import Budget
from mtlbench.registry import METHODS, WEIGHTINGS
from mtlbench.results import environment


@dataclasses.dataclass
class BenchShape:
    tasks: int = 40
    batch: int = 64
    size: int = 32
    matmuls: tuple[int, ...] = (512, 1024, 2048)
    repeats: int = 5
    cross_stitch_tasks: tuple[int, ...] = (10, 40)
    weighting_tasks: tuple[int, ...] = (10, 40)


QUICK = BenchShape(tasks=4, batch=16, size=16, matmuls=(256, 512), repeats=3, cross_stitch_tasks=(2, 4),
                   weighting_tasks=(2, 4))


class Bench:
    def __init__(self, device: str = "cpu", shape: BenchShape | None = None) -> None:
        self.device, self.shape = torch.device(device), shape or BenchShape()
        self.kept_heap = tune_allocator()
        self.x = torch.randn(self.shape.batch, 3, self.shape.size, self.shape.size, device=self.device)
        self.x = self.x.contiguous(memory_format=torch.channels_last)

    # ----- helpers for methods' own figures -------------------------------------------------
    def turns(self, **fns) -> dict[str, list[float]]:
        return time_turns(fns, warmup=2, repeats=self.shape.repeats, device=str(self.device))

    def timed(self, fn) -> float:
        """Median seconds of ``fn`` after 2 warm-up calls."""
        return time_call(fn, warmup=2, repeats=self.shape.repeats, device=str(self.device))["median_s"]

    def ratio(self, fns: dict, over: str, under: str) -> float:
        """``fns[over]`` time over ``fns[under]`` time, timed in turns."""
        return median_ratio(self.turns(**fns), over, under)

    @staticmethod
    def median(times: list[float]) -> float:
        return statistics.median(times)

    def predict_all(self, model) -> callable:
        return torch.no_grad()(lambda: model.predict_all(self.x))

    def model(self, method: str, tasks: int, backbone_options: dict | None = None, **method_options):
        """(config, model) of ``method`` with ``method_options``, on the bench's device."""
        cfg = RunConfig(method=method, tasks=tasks, device=str(self.device), steps_per_task=1,
                        backbone_options=backbone_options or {},
                        method_options=METHODS.get(method).resolve_options(method_options))
        model = build_method(cfg, 3).to(self.device, memory_format=torch.channels_last)
        model.prepare(self.device)
        return cfg, model

    def train_step(self, cfg: RunConfig, model) -> callable:
        """One call = one training step of ``model`` through its own ``train_step``."""
        trainer = Trainer(model, dataclasses.replace(cfg, lr_schedule="constant"), 10_000)
        y = torch.randint(0, 2, (self.shape.batch, cfg.tasks), device=self.device)
        schedule = iter(model.schedule(Budget(10_000, 10_000), torch.Generator().manual_seed(0)))

        def step():
            tasks, _ = next(schedule)
            model.train_step(self.x, y, tasks, trainer)
        return step

    # ----- generic figures ------------------------------------------------------------------
    def ceilings(self) -> dict[str, tuple[callable, float]]:
        """Candidate peaks: square fp32 matmuls of several sizes, and the default backbone's
        convolutions (forward and backward, channels_last, at the bench's batch)."""
        out = {}
        for n in self.shape.matmuls:
            a, b = (torch.randn(n, n, device=self.device) for _ in range(2))
            out[f"matmul_{n}"] = (lambda a=a, b=b: a @ b, 2 * n ** 3)
        size = self.shape.size
        for cin, cout, hw in ((32, 64, size // 2), (64, 128, size // 4), (128, 128, size // 8)):
            x = torch.randn(self.shape.batch, cin, hw, hw, device=self.device).contiguous(
                memory_format=torch.channels_last).requires_grad_()
            w = torch.randn(cout, cin, 3, 3, device=self.device).contiguous(
                memory_format=torch.channels_last).requires_grad_()
            flops = 2 * self.shape.batch * cout * cin * 9 * hw * hw

            def conv(x=x, w=w):
                F.conv2d(x, w, padding=1).sum().backward()
            out[f"conv_{cin}x{cout}_{hw}px"] = (conv, 3 * flops)  # forward, input and weight gradients
        return out

    def ceiling_and_train(self) -> dict:
        """The best of the candidate peaks (the ceiling) and a training step of the default
        backbone under ``hard``, each candidate in turns with the step: GFLOP/s of each, and
        the step's fraction of the best (the smallest per-candidate fraction)."""
        cfg, model = self.model("hard", self.shape.tasks)
        flops = method_flops(cfg, (3, self.shape.size, self.shape.size))["train_per_pair"]
        step_flops = flops * self.shape.batch * self.shape.tasks
        train = self.train_step(cfg, model)
        candidates, fractions, train_times = {}, {}, []
        for name, (fn, work) in self.ceilings().items():
            t = self.turns(peak=fn, train=train)
            candidates[name] = work / statistics.median(t["peak"]) / 1e9
            fractions[name] = step_flops / work * median_ratio(t, "peak", "train")
            train_times += t["train"]
        best = max(candidates, key=candidates.get)
        return {"ceiling_gflops": candidates[best], "ceiling_from": best, "ceiling_candidates_gflops": candidates,
                "train_gflops": step_flops / statistics.median(train_times) / 1e9,
                "train_fraction_of_ceiling": min(fractions.values())}

    def weighting_step_s(self) -> dict:
        """Training-step time of every weighting on ``hard`` at each T, in seconds and over ``ew``."""
        out = {}
        for tasks in self.shape.weighting_tasks:
            steps = {name: self.train_step(*self.model("hard", tasks, weighting=name)) for name in WEIGHTINGS.names()}
            times = self.turns(**steps)
            out[f"T{tasks}"] = {name: {"seconds": statistics.median(times[name]),
                                       "over_ew": median_ratio(times, name, "ew")} for name in steps}
        return out

    def data_fraction_of_step(self) -> float:
        """Batch slicing and normalisation time over one default ``hard`` training step."""
        n = 10_000
        images = torch.randint(0, 256, (n, 3, self.shape.size, self.shape.size), dtype=torch.uint8,
                               device=self.device)
        labels = torch.randint(0, 2, (n, self.shape.tasks), dtype=torch.uint8, device=self.device)
        batches = Batches(images, labels, self.shape.batch, 0, (0.5,) * 3, (0.25,) * 3)
        k = iter(range(10 ** 9))
        step = self.train_step(*self.model("hard", self.shape.tasks))
        return self.ratio({"data": lambda: batches.get(next(k)), "step": step}, "data", "step")

    def run(self) -> dict:
        figures = {**self.ceiling_and_train(), "methods": {}}
        for name in METHODS.names():
            own = METHODS.get(name).bench_figures(self)
            if own:
                figures["methods"][name] = own
        figures["weighting_step_s"] = self.weighting_step_s()
        figures["data_fraction_of_step"] = self.data_fraction_of_step()
        figures["setting"] = {**dataclasses.asdict(self.shape), "device": str(self.device),
                              "threads": torch.get_num_threads(), "memory_format": "channels_last",
                              "backbone": "convnet (default)", "tf32": tf32(self.device),
                              "allocator": "freed memory kept" if self.kept_heap else "default",
                              "timing": "figure and reference in turns after 2 warm-up calls; median of per-turn ratios"}
        figures["environment"] = environment()
        return figures


def _flatten(prefix: str, value) -> list[tuple[str, object]]:
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in _flatten(f"{prefix}[{k}]" if prefix else k, v)]
    return [(prefix, value)]


def render(figures: dict) -> str:
    s = figures["setting"]
    rows = [("ceiling_gflops", f"{figures['ceiling_gflops']:.1f}", f"best of: {figures['ceiling_from']}"),
            ("train_gflops", f"{figures['train_gflops']:.1f}", f"hard, T={s['tasks']}, batch {s['batch']}, {s['size']}px"),
            ("train_fraction_of_ceiling", f"{figures['train_fraction_of_ceiling']:.2f}", "at most 1 against a real ceiling")]
    rows += [(f"  candidate[{k}]", f"{v:.1f}", "GFLOP/s") for k, v in figures["ceiling_candidates_gflops"].items()]
    for method, own in figures["methods"].items():
        for name, value in _flatten("", own):
            rows.append((f"{method}: {name}", f"{value:.3f}" if isinstance(value, float) else str(value), ""))
    for tasks, per in figures["weighting_step_s"].items():
        for name, v in per.items():
            rows.append((f"weighting_step_s[{tasks}][{name}]", f"{v['seconds'] * 1000:.1f} ms",
                         f"{v['over_ew']:.2f}x ew"))
    rows.append(("data_fraction_of_step", f"{figures['data_fraction_of_step']:.4f}", "target < 0.05"))
    width = max(len(r[0]) for r in rows)
    head = f"device {s['device']}, {s['threads']} threads; {s['timing']}"
    return "\n".join([head] + [f"{a:<{width}}  {b:>10}  {c}" for a, b, c in rows])
