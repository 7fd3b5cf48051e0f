"""Task weightings: each against its defining property, and each running on every method it fits."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from mtlbench.config import RunConfig
from mtlbench.data import Batches
from mtlbench.engine import Trainer, build_method
from mtlbench.method import SCHEDULES
from mtlbench.registry import METHODS, WEIGHTINGS
from mtlbench.weighting import blocked_gram, gram_of, min_norm_simplex, task_gradients
from mtlbench.weightings.aligned import alignment
from mtlbench.weightings.cagrad import CAGrad, CAGradOptions
from mtlbench.weightings.imtl import imtl_alpha
from mtlbench.weightings.nash import nash_alpha
from mtlbench.weightings.pcgrad import project

from helpers import with_method


def weighting(name: str, tasks: int, **options):
    cls = WEIGHTINGS.get(name)
    return cls(tasks, cls.options_class(**options))


def gradients(tasks: int, dim: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randn(tasks, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----- gradient weightings: properties on constructed gradients -----------------------------
def test_pcgrad_projected_gradients_of_conflicting_pairs_no_longer_conflict():
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)  # g1 · g2 = -1: conflict
    a = project(gram_of(g), [[0, 1], [1, 0]])
    projected = a @ g
    assert projected[0] @ g[1] == pytest.approx(0.0, abs=1e-12)
    assert projected[1] @ g[0] == pytest.approx(0.0, abs=1e-12)
    # a pair that does not conflict is left alone
    g = torch.tensor([[1.0, 0.2], [0.5, 1.0]], dtype=torch.float64)
    assert torch.equal(project(gram_of(g), [[0, 1], [1, 0]]), torch.eye(2, dtype=torch.float64))
    # more tasks: each projected gradient does not conflict with the last task it was projected on
    g = gradients(5, 3)
    orders = [[(i + k) % 5 for k in range(5)] for i in range(5)]
    projected = project(gram_of(g), orders) @ g
    for i, order in enumerate(orders):
        last = [j for j in order if j != i][-1]
        assert projected[i] @ g[last] >= -1e-10


def test_mgda_two_tasks_is_the_closed_form_min_norm_point():
    for seed in range(5):
        g1, g2 = gradients(2, 4, seed)
        gamma = float(((g2 - g1) @ g2) / ((g1 - g2) @ (g1 - g2)))
        gamma = min(max(gamma, 0.0), 1.0)
        w = min_norm_simplex(gram_of(torch.stack([g1, g2])))
        assert w.tolist() == pytest.approx([gamma, 1 - gamma], abs=1e-9)


@pytest.mark.parametrize("tasks,dim", [(5, 8), (12, 6), (40, 100)])
def test_mgda_many_tasks_meets_the_optimality_conditions(tasks, dim):
    """Min of wᵀQw on the simplex: (Qw)_i equals wᵀQw where w_i > 0 and is at least it elsewhere."""
    g = gradients(tasks, dim, seed=tasks)
    q = gram_of(g)
    w = min_norm_simplex(q)
    assert w.sum().item() == pytest.approx(1.0) and (w >= 0).all()
    value, grad = float(w @ q @ w), q @ w
    scale = float(q.diagonal().max())
    assert (grad >= value - 1e-7 * scale).all()
    assert (grad[w > 1e-9] - value).abs().max() <= 1e-7 * scale


def test_cagrad_with_c_zero_is_the_mean_gradient():
    g = gradients(4)
    c = CAGrad(4, CAGradOptions(c=0.0)).coefficients(gram_of(g), torch.ones(4))
    assert torch.allclose(c @ g, g.mean(dim=0))


def test_cagrad_improves_the_worst_task_over_the_mean():
    g = torch.tensor([[1.0, 0.1], [-0.6, 1.0], [0.9, -0.3]], dtype=torch.float64)
    c = CAGrad(3, CAGradOptions(c=0.5, rescale=False)).coefficients(gram_of(g), torch.ones(3))
    worst = lambda d: float((g @ d).min())  # noqa: E731
    assert worst(c @ g) >= worst(g.mean(dim=0)) - 1e-9


@pytest.mark.parametrize("tasks", [2, 3, 8])
def test_nash_solution_satisfies_the_bargaining_equations(tasks):
    g = gradients(tasks, 20, seed=tasks)
    q = gram_of(g)
    alpha = nash_alpha(q)
    assert (alpha > 0).all()
    assert torch.allclose(q @ alpha, 1.0 / alpha, rtol=1e-6)


@pytest.mark.parametrize("tasks", [2, 3, 6])
def test_imtl_aggregate_has_equal_projections_on_every_unit_gradient(tasks):
    g = gradients(tasks, 10, seed=tasks)
    alpha = imtl_alpha(gram_of(g))
    assert alpha.sum().item() == pytest.approx(1.0)
    d = alpha @ g
    projections = (g / g.norm(dim=1, keepdim=True)) @ d
    assert torch.allclose(projections, projections[0].expand_as(projections), rtol=1e-8)


@pytest.mark.parametrize("tasks,dim", [(3, 10), (6, 20), (5, 3)])
def test_aligned_gradients_have_equal_singular_values(tasks, dim):
    g = gradients(tasks, dim, seed=dim)
    aligned = alignment(gram_of(g)) @ g
    singular = torch.linalg.svdvals(aligned)
    kept = singular[singular > 1e-8 * singular.max()]
    assert len(kept) == min(tasks, dim)
    assert torch.allclose(kept, kept[0].expand_as(kept), rtol=1e-6)
    smallest = torch.linalg.svdvals(g)[min(tasks, dim) - 1]
    assert kept[0].item() == pytest.approx(smallest.item(), rel=1e-6)  # the smallest of G


# ----- loss weightings: update rules on crafted loss sequences ------------------------------
def test_uw_weights_are_exp_minus_log_variance_and_settle_at_log_two_l():
    uw = weighting("uw", 2)
    losses = torch.tensor([0.5, 2.0])
    assert torch.equal(uw.weights(losses), torch.ones(2))  # log-variances start at 0
    opt = torch.optim.SGD(uw.parameters(), lr=0.2)
    for _ in range(2000):
        opt.zero_grad()
        uw.loss(losses, uw.weights(losses)).backward()
        opt.step()
    assert uw.log_var.detach().tolist() == pytest.approx(torch.log(2 * losses).tolist(), abs=1e-4)


def test_dwa_uses_the_ratio_of_the_last_two_periods():
    dwa = weighting("dwa", 2, temperature=2.0, period=2)
    sequence = [torch.tensor(v) for v in ([1.0, 1.0], [1.0, 1.0], [0.5, 1.0], [0.5, 1.0])]
    for losses in sequence:  # two periods of two steps: weights 1 meanwhile
        assert torch.equal(dwa.weights(losses), torch.ones(2))
    w = dwa.weights(torch.tensor([0.4, 1.0]))  # ratios 0.5 and 1.0
    expected = 2 * torch.softmax(torch.tensor([0.5, 1.0]) / 2.0, 0)
    assert torch.allclose(w, expected.float())


def test_rlw_weights_are_t_times_a_softmax_of_gaussian_noise():
    rlw = weighting("rlw", 3)
    draws = torch.stack([rlw.weights(torch.ones(3)) for _ in range(2000)])
    assert torch.allclose(draws.sum(dim=1), torch.full((2000,), 3.0), atol=1e-5)
    assert (draws > 0).all() and draws.std(dim=0).min() > 0.1  # random each step
    assert draws.mean(dim=0).tolist() == pytest.approx([1.0, 1.0, 1.0], abs=0.05)  # exchangeable


def test_random_weightings_draw_from_the_run_seed():
    def rlw_draws(seed):
        torch.manual_seed(seed)  # what the engine does before it builds the method
        rlw = weighting("rlw", 4)
        torch.rand(10)  # draws from the global stream after construction do not matter
        return torch.stack([rlw.weights(torch.ones(4)) for _ in range(5)])

    def pcgrad_orders(seed):
        torch.manual_seed(seed)
        pc = weighting("pcgrad", 5)
        return [torch.randperm(5, generator=pc.generator).tolist() for _ in range(5)]

    assert torch.equal(rlw_draws(1), rlw_draws(1)) and pcgrad_orders(1) == pcgrad_orders(1)
    assert not torch.equal(rlw_draws(1), rlw_draws(2)) and pcgrad_orders(1) != pcgrad_orders(2)
    g = torch.Generator().manual_seed(0)  # seed 0 draws what it drew before the seed was used
    old = torch.stack([4 * torch.softmax(torch.randn(4, generator=g, dtype=torch.float64), 0) for _ in range(5)])
    assert torch.allclose(rlw_draws(0), old.float())


def test_famo_weights_and_logit_update_follow_the_paper():
    famo = weighting("famo", 2, lr=0.5, decay=0.0)
    losses = torch.tensor([1.0, 4.0])
    w = famo.weights(losses)
    z = torch.tensor([0.5, 0.5])
    c = 1 / (z / losses).sum()
    assert torch.allclose(w, c * z / losses)  # the gradient of Σ c z_t log L_t
    famo.after_step(torch.tensor([0.5, 4.0]))  # task 0's loss halved, task 1's did not move
    delta = torch.tensor([math.log(2.0), 0.0])
    expected = -0.5 * z * (delta - (z * delta).sum())
    assert torch.allclose(famo.logits, expected)
    assert famo.logits[1] > famo.logits[0]  # the task that improved least gains weight


def test_gradnorm_moves_weights_towards_balanced_gradient_norms():
    gn = weighting("gradnorm", 2, alpha=1.5)
    losses = torch.tensor([1.0, 1.0])
    norms = torch.tensor([3.0, 1.0])  # task 0's gradient is 3x larger at the last shared layer
    grad = gn.weight_gradient(losses, norms)  # equal loss ratios: target is the mean norm, 2
    assert grad.tolist() == [3.0, -1.0]  # sign(G - target) * norm
    gn.weight.grad = grad
    torch.optim.SGD(gn.parameters(), lr=0.1).step()
    gn.post_step()
    assert gn.weight[0] < gn.weight[1] and gn.weight.sum().item() == pytest.approx(2.0)
    # a task whose loss fell less than the others' (higher ratio) gets a higher target
    fresh = weighting("gradnorm", 2, alpha=1.5)
    fresh.weight_gradient(torch.tensor([1.0, 1.0]), torch.ones(2))
    grad = fresh.weight_gradient(torch.tensor([0.9, 0.1]), torch.ones(2))
    assert grad[0] < 0 < grad[1]


# ----- the machinery ------------------------------------------------------------------------
def tiny(method: str, weighting_name: str, tasks: int = 3, **options):
    cfg = with_method(RunConfig(tasks=tasks, backbone_options={"widths": (4, 8)}, lr_schedule="constant"),
                      method, weighting=weighting_name, **options)
    return cfg, build_method(cfg, 3)


def compatible():
    for method in METHODS.names():
        cls = METHODS.get(method)
        fields = {f.name for f in dataclasses.fields(cls.options_class)}
        if "weighting" not in fields:
            continue
        schedule = next(s for s in cls.schedules if SCHEDULES[s].many_tasks_per_step)
        for name in WEIGHTINGS.names():
            yield method, schedule, name


@pytest.mark.parametrize("method,schedule,name", list(compatible()))
def test_every_weighting_steps_every_compatible_method(method, schedule, name):
    cfg, model = tiny(method, name, schedule=schedule)
    trainer = Trainer(model, cfg, 10)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 2, (8, 3))
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        losses = model.train_step(x, y, [0, 1, 2], trainer)
        assert torch.isfinite(losses).all() and losses.shape == (3,)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    summary = trainer.weighting.summary()
    assert summary["steps"] == 3 and len(summary["weights_mean"]) == 3


def test_ew_is_the_plain_sum_bit_for_bit():
    cfg, model = tiny("hard", "ew")
    reference = build_method(cfg, 3)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 2, (8, 3))
    model.train_step(x, y, [0, 1, 2], Trainer(model, cfg, 10))
    trainer = Trainer(reference, cfg, 10)
    logits = reference(x, [0, 1, 2])
    torch.nn.functional.binary_cross_entropy_with_logits(logits, y.float(), reduction="none").mean(0).sum().backward()
    trainer.optimizer.step()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)


def test_gradient_weighting_update_is_the_combination_of_task_gradients():
    """d = Σ c_t g_t on the shared parameters; the heads get their own loss's gradient."""
    cfg, model = tiny("hard", "mgda")
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 2, (8, 3))
    trainer = Trainer(model, cfg, 10, optimize=False)
    logits = model(x, [0, 1, 2])
    losses = trainer.losses(logits, y, [0, 1, 2])
    shared = model.shared_parameters()
    g = task_gradients(losses, shared, 1.0, trainer)
    c = trainer.weighting.coefficients(gram_of(g), losses.detach())
    trainer.weighting.backward(losses, model, trainer, None)
    got = torch.cat([p.grad.reshape(-1) for p in shared])
    assert torch.allclose(got, c.float() @ g, atol=1e-7)
    heads = model.heads.weight.grad
    assert heads is not None and torch.isfinite(heads).all()


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_unit_coefficients_take_the_same_optimiser_steps_as_ew(monkeypatch, layout):
    """The combined gradient goes into each parameter in its own memory layout. In
    channels_last (as runs train), a plain-layout gradient was read by the fused Adam in the
    parameter's memory order, scrambling every conv's update: this test failed then."""
    from mtlbench.weightings.pcgrad import PCGrad
    monkeypatch.setattr(PCGrad, "coefficients", lambda self, gram, losses: torch.ones(len(gram), dtype=torch.float64))
    x, y = torch.randn(8, 3, 8, 8).contiguous(memory_format=layout), torch.randint(0, 2, (8, 3))
    after = {}
    for name in ("ew", "pcgrad"):
        torch.manual_seed(0)
        cfg, model = tiny("hard", name)
        model = model.to(memory_format=layout)
        trainer = Trainer(model, cfg, 10)
        for _ in range(3):
            model.train_step(x, y, [0, 1, 2], trainer)
        assert all(p.grad.stride() == p.stride() for p in model.parameters())
        after[name] = [p.detach().clone() for p in model.parameters()]
    assert max((a - b).abs().max().item() for a, b in zip(after["ew"], after["pcgrad"])) < 1e-4


def test_over_the_memory_budget_the_gram_matrix_is_built_in_blocks_with_the_same_update():
    cfg, model = tiny("hard", "nash", tasks=5)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 2, (8, 5))
    trainer = Trainer(model, cfg, 10, optimize=False)
    losses = trainer.losses(model(x, list(range(5))), y, list(range(5)))
    shared = model.shared_parameters()
    full = gram_of(task_gradients(losses, shared, 1.0, trainer))
    for block in (1, 2, 3):
        assert torch.allclose(blocked_gram(losses, shared, 1.0, trainer, block), full, rtol=1e-5, atol=1e-9)
    updates = []
    for memory_mb in (1024, 0):  # 0 MB: never keep the T x P matrix
        cfg2, m = tiny("hard", "nash", tasks=5)
        m.load_state_dict(model.state_dict())
        trainer = Trainer(m, cfg2, 10, optimize=False)
        trainer.weighting.options.memory_mb = memory_mb
        trainer.weighting.backward(trainer.losses(m(x, list(range(5))), y, list(range(5))), m, trainer, None)
        updates.append(torch.cat([p.grad.reshape(-1) for p in m.parameters()]))
    assert (updates[0] - updates[1]).abs().max() <= 1e-5 * updates[0].abs().max()


def test_representation_gradients_need_a_shared_representation():
    from mtlbench.errors import MtlbenchError
    cfg, _ = tiny("hard", "mgda")
    cfg = with_method(cfg, "hard", weighting="mgda", weighting_options={"grads": "rep"})
    model = build_method(cfg, 3)
    trainer = Trainer(model, cfg, 10)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 2, (8, 3))
    assert torch.isfinite(model.train_step(x, y, [0, 1, 2], trainer)).all()
    assert trainer.weighting.summary()["options"]["grads"] == "rep"
    cs = with_method(cfg, "cross-stitch", weighting="mgda", weighting_options={"grads": "rep"})
    model = build_method(cs, 3)
    with pytest.raises(MtlbenchError, match="no representation shared by all tasks"):
        model.train_step(x, y, [0, 1, 2], Trainer(model, cs, 10))


def test_a_run_records_its_weights_over_training(tmp_path, capsys):
    from mtlbench.cli import main
    import json
    from helpers import TINY_ARGS
    assert main(["run", "--methods", "hard,tr", "--weighting", "uw", "--tasks", "3", "--out", str(tmp_path),
                 *TINY_ARGS]) == 0
    runs = {json.loads(p.read_text())["label"]: json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")}
    assert set(runs) == {"hard+uw", "tr σ=0.5"}  # tr samples one task per step: no weighting
    summary = runs["hard+uw"]["train"]["weighting"]
    assert summary["name"] == "uw" and summary["steps"] == 2 and len(summary["snapshots"]) >= 1
    assert "weighting" not in runs["tr σ=0.5"]["train"]
    assert "weighting" not in runs["tr σ=0.5"]["config"]["method_options"]


def test_representation_gradients_run_end_to_end(tmp_path):
    """``grads=rep`` through the whole run, FLOP counting included (it once failed there:
    the module tracker's hooks on a leaf input cannot run inside autograd.grad)."""
    from mtlbench.cli import main
    import json
    from helpers import TINY_ARGS
    assert main(["run", "--methods", "hard", "--weighting", "mgda,pcgrad", "-o", "weighting.grads=rep",
                 "--tasks", "3", "--out", str(tmp_path), *TINY_ARGS]) == 0
    runs = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")]
    assert sorted(r["label"] for r in runs) == ["hard+mgda", "hard+pcgrad"]
    for r in runs:
        assert r["status"] == "ok", r.get("traceback")
        assert r["train"]["weighting"]["options"]["grads"] == "rep"
        assert r["flops"]["train_per_pair"] > r["flops"]["forward_per_image_task"] > 0
