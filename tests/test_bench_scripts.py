"""The benchmark scripts under tests/benchmarks run and report what they say (no thresholds)."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from mtlbench import layers
from mtlbench.bench import QUICK, Bench
from mtlbench.methods.tr.compact import PAD

SCRIPTS = Path(__file__).parent / "benchmarks"


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compact_bound_widths_flops_and_ratios():
    bound = script("compact_bound").bound
    b = Bench("cpu", QUICK)
    out = bound(b, 0.5)
    _, tr = b.model("tr", QUICK.tasks, sigma=0.5, impl="compact")
    full = [r.masks.shape[1] for r in tr.routers]
    kept = [int(k) for k in out["widths"]["kept"].split("-")]
    computed = [int(k) for k in out["widths"]["computed"].split("-")]
    assert out["widths"]["full"] == "-".join(map(str, full))
    assert out["widths"]["fraction"] == "-".join(str(round(0.5 * c)) for c in full)
    for layer, router in enumerate(tr.routers):  # the most common kept count, padded up to PAD
        counts = router.masks.sum(dim=1).long().tolist()
        assert counts.count(kept[layer]) == max(counts.count(c) for c in counts)
        assert computed[layer] == min(full[layer], -(-kept[layer] // PAD) * PAD)
    # more channels, more FLOPs: the padded widths save fewer than the kept ones
    assert out["flop_ratio"]["kept"] >= out["flop_ratio"]["computed"] >= 1
    ratios = [v for k in ("flop_ratio", "plain_speedup", "conv_speedup") for v in out[k].values()]
    ratios.append(out["tr_compact_speedup"])
    assert all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in ratios)


def test_auto_rules_group_budget_reports_each_budget():
    out = script("auto_rules").group_budget("cpu", 2, (1, 64))
    assert set(out) == {"1MiB", "64MiB", "stl_loop_s", "tr_masked_passes_s"}
    for budget in ("1MiB", "64MiB"):
        assert out[budget]["tr_s"] > 0 and out[budget]["stl_s"] > 0
        assert out[budget]["tr_peak_mb"] is None  # peak memory is measured on CUDA only
    assert layers.GROUP_BYTES["cpu"] == 64 << 20  # the budget is put back
