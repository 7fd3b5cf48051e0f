"""What bounds ``tr_compact_speedup``: the same figures for plain networks of the widths compact computes.

    python tests/benchmarks/compact_bound.py                 # sigma 0.5 and 0.25, T=40, cpu
    python tests/benchmarks/compact_bound.py --device cuda --sigmas 0.5

For each sigma, with the ``mtlbench bench`` shapes (default backbone, batch 64, 32 px):

- ``widths``: channels per layer of the full network, of what a task keeps (the most common
  count over the T tasks), of what compact computes in training (kept, padded to
  ``mtlbench.methods.tr.compact.PAD``), and ``fraction``: sigma times the full widths, rounded (what a
  task would keep if it kept exactly a fraction sigma, with no units of its own);
- ``flop_ratio``: training-step FLOPs (``torch.utils.flop_counter``) of the full network
  over a plain network of each of those widths;
- ``plain_speedup``: a training step of the full plain network over one of those widths
  (what an unrouted network of those widths gives, with no gathers or masks at all);
- ``conv_speedup``: the same for the convolutions alone (forward + backward of each conv
  at its input size, summed), so batch norm, ReLU, pooling and the optimiser play no part;
- ``tr_compact_speedup``: the masked dense ``tr`` step over the compact one, as ``bench``.

Each ratio is measured in one process, its calls in turns after 2 warm-up calls, as the
median of 7 per-turn ratios (as ``mtlbench bench``).
"""
from __future__ import annotations

import argparse
import collections
import json

import torch
import torch.nn.functional as F
from torch import nn

from mtlbench.bench import Bench, BenchShape
from mtlbench.measure import count_flops, median_ratio
from mtlbench.methods.tr.bench import compact_speedup
from mtlbench.methods.tr.compact import PAD


def common_widths(model, pad: int, device: torch.device) -> tuple[int, ...]:
    """Per layer, the channel count most tasks compute (kept, padded to ``pad``)."""
    per_task = [[len(idx) for idx, _ in model.compact.active(t, device, pad)] for t in range(model.num_tasks)]
    return tuple(collections.Counter(layer).most_common(1)[0][0] for layer in zip(*per_task, strict=True))


def conv_inputs(model: nn.Module, x: torch.Tensor) -> list[tuple[nn.Conv2d, tuple[int, ...]]]:
    """Each conv of ``model`` with the shape of its input for ``x``."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, args, out: seen.append((m, tuple(args[0].shape))))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x, [0])
    for h in hooks:
        h.remove()
    return seen


def conv_step(b: Bench, layers, widths: tuple[int, ...]):
    """A call running forward + backward of every conv at these output widths (inputs: the
    previous width)."""
    calls, cin = [], None
    for (conv, shape), cout in zip(layers, widths, strict=True):
        cin = shape[1] if cin is None else cin
        x = torch.randn(shape[0], cin, *shape[2:], device=b.device).contiguous(memory_format=torch.channels_last)
        w = torch.randn(cout, cin, *conv.kernel_size, device=b.device).contiguous(memory_format=torch.channels_last)
        x.requires_grad_(bool(calls)), w.requires_grad_()
        g = torch.randn_like(F.conv2d(x, w, None, conv.stride, conv.padding))
        calls.append((x, w, g, conv))
        cin = cout

    def run():
        for x, w, g, conv in calls:
            F.conv2d(x, w, None, conv.stride, conv.padding).backward(g)
    return run


def bound(b: Bench, sigma: float) -> dict:
    cfg, tr = b.model("tr", b.shape.tasks, sigma=sigma, impl="compact")
    full = tuple(r.masks.shape[1] for r in tr.routers)
    widths = {"full": full, "kept": common_widths(tr, 1, b.device), "computed": common_widths(tr, PAD, b.device),
              "fraction": tuple(max(1, round(sigma * c)) for c in full)}
    out = {"widths": {k: "-".join(map(str, w)) for k, w in widths.items()},
           "flop_ratio": {}, "plain_speedup": {}, "conv_speedup": {}}
    steps, flops, convs = {}, {}, {}
    for name, w in widths.items():
        plain_cfg, plain = b.model("hard", 1, backbone_options={"widths": w})
        if name == "full":  # widths are listed full first
            layers = conv_inputs(plain, b.x)
        steps[name] = b.train_step(plain_cfg, plain)
        flops[name] = count_flops(steps[name])
        convs[name] = conv_step(b, layers, w)
    plain_t, conv_t = b.turns(**steps), b.turns(**convs)
    for name in ("kept", "computed", "fraction"):
        out["flop_ratio"][name] = flops["full"] / flops[name]
        out["plain_speedup"][name] = median_ratio(plain_t, "full", name)
        out["conv_speedup"][name] = median_ratio(conv_t, "full", name)
    out["tr_compact_speedup"] = compact_speedup(b, sigma)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--sigmas", default="0.5,0.25")
    args = p.parse_args()
    b = Bench(args.device, BenchShape(repeats=7))
    out = {"device": torch.cuda.get_device_name(0) if b.device.type == "cuda" else "cpu",
           "threads": torch.get_num_threads(), "torch": torch.__version__}
    for s in args.sigmas.split(","):
        out[s] = bound(b, float(s))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
