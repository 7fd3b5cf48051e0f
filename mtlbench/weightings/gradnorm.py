"""``gradnorm``: gradient normalisation (Chen, Badrinarayanan, Lee, Rabinovich, "GradNorm:
Gradient Normalization for Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018,
arXiv 1711.02257).

Learned loss weights w_t (1 at the start). Each step takes each task's gradient norm at the
last shared layer W, ``G_t = w_t ||∇_W L_t||``, and pulls it towards
``Ḡ · r_t^α`` (Ḡ the mean norm, r_t the task's loss ratio ``L_t / L_t(0)`` over the mean
ratio, both held constant): the weights descend ``Σ_t |G_t - Ḡ r_t^α|``, whose gradient in w_t is
``sign(G_t - target_t) ||∇_W L_t||``, with the run's optimiser; then they are renormalised to
sum to T. The network descends ``Σ w_t L_t``. α = 1.5 as in the paper's default.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mtlbench.errors import MtlbenchError
from mtlbench.registry import register_weighting
from mtlbench.weighting import Weighting, WeightingOptions, last_shared_layer


@dataclass
class GradNormOptions(WeightingOptions):
    alpha: float = 1.5


@register_weighting("gradnorm", "GradNorm: learned weights that balance gradient norms at the last shared layer.")
class GradNorm(Weighting):
    options_class = GradNormOptions
    paper = "Chen et al., ICML 2018"

    @classmethod
    def check_options(cls, options: GradNormOptions) -> None:
        if options.alpha < 0:
            raise MtlbenchError("weighting gradnorm needs alpha >= 0")

    def __init__(self, num_tasks: int, options: GradNormOptions) -> None:
        super().__init__(num_tasks, options)
        self.weight = nn.Parameter(torch.ones(num_tasks))
        self.register_buffer("initial", torch.zeros(num_tasks))

    def weight_gradient(self, losses: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """d/dw of ``Σ |w_t n_t - Ḡ r_t^α|`` with the target held constant."""
        if not bool((self.initial > 0).all()):
            self.initial.copy_(losses.detach())
        ratio = losses.detach() / self.initial
        ratio = ratio / ratio.mean()
        g = self.weight.detach() * norms
        target = g.mean() * ratio ** self.options.alpha
        return torch.sign(g - target) * norms

    def backward(self, losses: torch.Tensor, method, trainer, rep: tuple | None) -> None:
        layer = last_shared_layer(method)
        norms = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            trainer.scaled(losses[t]), layer, retain_graph=True)]).norm() for t in range(len(losses))])
        norms = norms / trainer.grad_scale()
        trainer.backward((self.weight.detach() * losses).sum())
        # scaled like every other gradient, so that a gradient scaler's unscale gives it back
        self.weight.grad = (self.weight_gradient(losses, norms.detach()) * trainer.grad_scale()).to(self.weight.dtype)
        self.record(self.weight.detach())

    def post_step(self) -> None:
        with torch.no_grad():
            self.weight.clamp_(min=1e-6)
            self.weight.mul_(self.num_tasks / self.weight.sum())
