"""The CUDA path: the CPU equivalences again on a GPU, mixed precision end to end, the auto rules.

Skipped where no GPU is visible (CI has none). On a GPU machine: ``pytest tests/test_cuda.py``.
Comparisons run with TF32 off, so that fp32 means fp32 (cuDNN convolutions use TF32 by default).
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from mtlbench.config import RunConfig
from mtlbench.engine import Trainer, build_method
from mtlbench.methods.columns import AUTO_COLUMNS

from helpers import TINY_ARGS, with_method

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
TOL = dict(rtol=1e-3, atol=1e-4)  # GPU kernels sum in other orders than the CPU's
CL = torch.channels_last


@pytest.fixture(autouse=True)
def strict_fp32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def close(a, b, **tol):
    return torch.allclose(a, b, **(tol or TOL))


def on_cuda(cfg: RunConfig):
    model = build_method(cfg, 3).to(CUDA, memory_format=CL)
    model.prepare(CUDA)
    return model


def images(n: int = 8, size: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, size, size, device=CUDA).contiguous(memory_format=CL)


def tr_config(sigma: float, schedule: str = "sample", tasks: int = 6, **options) -> RunConfig:
    return with_method(RunConfig(tasks=tasks, device="cuda", backbone_options={"widths": (8, 16, 16)}, seed=3),
                       "tr", sigma=sigma, schedule=schedule, **options)


def steps(model, cfg: RunConfig, batches: list, tasks: list[int]) -> list[torch.Tensor]:
    """Training steps through the method's own train_step; the losses of each."""
    trainer = Trainer(model, cfg, 100)
    return [model.train_step(x, y, tasks, trainer) for x, y in batches]


@pytest.mark.parametrize("bn_stats", ["task", "kept"])
@pytest.mark.parametrize("sigma", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("schedule", ["sample", "all"])
def test_compact_equals_dense_on_cuda(sigma, schedule, bn_stats):
    dense, compact = (on_cuda(tr_config(sigma, schedule, impl=impl, bn_stats=bn_stats)) for impl in ("dense", "compact"))
    assert (dense.impl, compact.impl) == ("dense", "compact")
    cfg = RunConfig(lr=1e-2, device="cuda", lr_schedule="constant")
    tasks = [2] if schedule == "sample" else list(range(6))
    batches = [(images(), torch.randint(0, 2, (8, 6), device=CUDA)) for _ in range(3)]
    losses = [steps(m, cfg, batches, tasks) for m in (dense, compact)]
    for a, b in zip(*losses, strict=True):
        assert close(a, b)
    for (name, p), q in zip(dense.named_parameters(), compact.parameters(), strict=True):
        assert close(p, q), name
    for (name, b), c in zip(dense.named_buffers(), compact.buffers(), strict=True):
        assert close(b.float(), c.float()), name
    dense.eval(), compact.eval()
    x = images()
    with torch.no_grad():
        assert close(dense(x, list(range(6))), compact(x, list(range(6))))


@pytest.mark.parametrize("sigma", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("mode,group", [("loop", 1), ("grouped", 1), ("grouped", 4), ("grouped", 6)])
def test_all_task_inference_on_cuda(sigma, mode, group):
    model = on_cuda(tr_config(sigma, impl="dense"))
    model.train()
    trainer = Trainer(model, RunConfig(device="cuda"), 100)
    for t in range(6):  # weights and running statistics away from their initial values
        model.train_step(images(), torch.randint(0, 2, (8, 6), device=CUDA), [t], trainer)
    model.eval()
    x = images(5)
    with torch.no_grad():
        out = model.all_task(x, model.heads.weight, model.heads.bias, mode, group)
        assert out.device.type == "cuda" and close(out, model(x, list(range(6))))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_all_task_inference_under_autocast_follows_the_masked_passes(precision):
    model = on_cuda(tr_config(0.5, impl="dense")).eval()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    x = images(16)
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        fast, reference = model.predict_all(x).float(), model(x, list(range(6))).float()
    assert torch.isfinite(fast).all()
    assert close(fast, reference, rtol=0.05, atol=0.05)  # both rounded to 8 (bf16) or 11 (fp16) bits


@pytest.mark.parametrize("method", ["cross-stitch", "stl"])
def test_grouped_columns_equal_the_loop_on_cuda(method):
    base = RunConfig(tasks=4, device="cuda", backbone_options={"widths": (8, 16, 16)}, seed=5)
    loop, grouped = (on_cuda(with_method(base, method, columns=c)) for c in ("loop", "grouped"))
    assert (loop.column_impl, grouped.column_impl) == ("loop", "grouped")
    cfg = RunConfig(optimizer="sgd", lr=0.05, device="cuda", lr_schedule="constant")
    batches = [(images(), torch.randint(0, 2, (8, 4), device=CUDA)) for _ in range(3)]
    loop.train(), grouped.train()
    for a, b in zip(steps(loop, cfg, batches, list(range(4))), steps(grouped, cfg, batches, list(range(4))),
                    strict=True):
        assert close(a, b)
    for (name, p), q in zip(loop.named_parameters(), grouped.parameters(), strict=True):
        assert close(p, q), name
    for (name, b), c in zip(loop.named_buffers(), grouped.buffers(), strict=True):
        assert close(b.float(), c.float()), name
    loop.eval(), grouped.eval()
    with torch.no_grad():
        x = images()
        assert close(loop.predict_all(x), grouped.predict_all(x))


def test_cuda_auto_choices_follow_the_tables():
    from mtlbench.methods.tr import AUTO_MAX_KEPT
    for sigma in (0.25, 0.5, 0.75, 1.0):
        model = on_cuda(with_method(RunConfig(tasks=40, device="cuda"), "tr", sigma=sigma))
        kept = model.describe()["mean_kept_fraction"]
        assert model.impl == ("compact" if kept <= AUTO_MAX_KEPT["cuda"] else "dense"), sigma
    for method in ("stl", "cross-stitch"):
        model = on_cuda(with_method(RunConfig(tasks=3, device="cuda"), method))
        assert model.column_impl == AUTO_COLUMNS["cuda"]
        assert model.describe()["column_impl"] == AUTO_COLUMNS["cuda"]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cli_run_on_cuda_records_device_and_precision(tmp_path, capsys, precision):
    from mtlbench.cli import main
    assert main(["run", "--methods", "tr,hard,separate,cross-stitch,stl", "--tasks", "3", "--device", "cuda",
                 "--precision", precision, "--out", str(tmp_path), *TINY_ARGS]) == 0
    runs = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")]
    assert len(runs) == 5
    for run in runs:
        assert run["status"] == "ok", run.get("error")
        rt = run["runtime"]
        assert rt["device"].startswith("cuda") and rt["precision"] == precision
        assert rt["grad_scaler"] == (precision == "fp16") and set(rt["tf32"]) == {"matmul", "cudnn"}
        assert run["memory"]["how"] == "torch.cuda.max_memory_allocated" and run["memory"]["peak_bytes"] > 0
        assert math.isfinite(run["metrics"]["mean_balanced_accuracy"])
        assert math.isfinite(run["train"]["final_loss"]) and run["train"]["optimizer_impl"] == "fused"
        assert run["environment"]["cuda"]


def test_bench_quick_on_cuda(capsys):
    from mtlbench.cli import main
    assert main(["bench", "--quick", "--json", "--device", "cuda"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["setting"]["device"] == "cuda" and figures["setting"]["tf32"] is not None
    tr, cs = figures["methods"]["tr"], figures["methods"]["cross-stitch"]
    values = [figures["ceiling_gflops"], figures["train_gflops"], figures["data_fraction_of_step"],
              tr["all_task_inference_speedup"], tr["compact_over_plain_network"], *tr["compact_speedup"].values(),
              *tr["all_task_inference_by_mode"].values(), *cs["cross_stitch_step_s_per_task"].values(),
              *cs["columns_grouped_speedup"].values(),
              *(v["over_ew"] for per in figures["weighting_step_s"].values() for v in per.values())]
    assert all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in values)


def test_stl_grouped_inference_in_parts_on_cuda(monkeypatch):
    from mtlbench import layers
    base = RunConfig(tasks=5, device="cuda", backbone_options={"widths": (8, 16, 16)})
    loop, grouped = (on_cuda(with_method(base, "stl", columns=c)) for c in ("loop", "grouped"))
    x = images(6)
    per_column = 6 * grouped.grouped.activation_elements(x) * x.element_size()
    monkeypatch.setitem(layers.GROUP_BYTES, "cuda", 2 * per_column)  # parts of 2, 2 and 1 columns
    loop.eval(), grouped.eval()
    with torch.no_grad():
        assert close(loop.predict_all(x), grouped.predict_all(x))


def test_same_seed_same_numbers_on_cuda(tmp_path, capsys):
    import warnings
    from mtlbench.cli import main
    results = []
    for i in range(2):
        out = tmp_path / str(i)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(["run", "--methods", "tr,hard,separate,cross-stitch,stl", "--tasks", "3", "--device", "cuda",
                         "--out", str(out), *TINY_ARGS]) == 0
        assert not [w for w in caught if "determinis" in str(w.message)], [str(w.message) for w in caught]
        runs = {}
        for p in (out / "runs").glob("*.json"):
            run = json.loads(p.read_text())
            assert run["runtime"]["deterministic"].startswith("torch.use_deterministic_algorithms")
            runs[run["label"]] = (run["metrics"]["accuracy"], run["train"]["final_loss"])
        results.append(runs)
    assert results[0] == results[1]


def test_weightings_run_on_cuda(tmp_path, capsys):
    from mtlbench.cli import main
    from mtlbench.registry import WEIGHTINGS
    assert main(["run", "--methods", "hard", "--weighting", ",".join(WEIGHTINGS.names()), "--tasks", "3",
                 "--device", "cuda", "--out", str(tmp_path), *TINY_ARGS]) == 0
    runs = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")]
    assert len(runs) == len(WEIGHTINGS.names()) and all(r["status"] == "ok" for r in runs)
