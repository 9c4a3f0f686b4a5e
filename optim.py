"""AdamW, the warm-up + cosine learning-rate schedule and global-norm gradient clipping, written out.

Follows CS336 assignment 1 (Algorithm 1 of Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019).
"""
import math
from collections.abc import Callable, Iterable

import torch


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay. Per parameter, with gradient g at step t = 1, 2, ...:

        m <- b1 m + (1 - b1) g            v <- b2 v + (1 - b2) g^2
        a_t = lr sqrt(1 - b2^t) / (1 - b1^t)
        theta <- theta - a_t m / (sqrt(v) + eps)
        theta <- theta - lr wd theta      (decay after the Adam update, as in CS336)

    `foreach=True` runs the same arithmetic as a few multi-tensor kernels per param group (fewer launches on GPU);
    the per-parameter loop is the readable reference and the tests check that both agree.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, foreach: bool = False):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"AdamW: lr, eps and weight_decay must be >= 0 (got {lr}, {eps}, {weight_decay})")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"AdamW: betas must lie in [0, 1) (got {betas})")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.foreach = foreach

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if self.foreach:
                self._step_foreach(group, params)
            else:
                self._step_loop(group, params)
        return loss

    def _state(self, p: torch.Tensor) -> dict:
        """Moments start at zero; `step` counts this parameter's updates (t in the formulas)."""
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["v"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        return state

    def _step_loop(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for p in params:
            state = self._state(p)
            m, v, t = state["m"], state["v"], state["step"]
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            alpha_t = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
            p.addcdiv_(m, v.sqrt().add_(eps), value=-alpha_t)
            p.mul_(1 - lr * wd)

    def _step_foreach(self, group: dict, params: list[torch.Tensor]) -> None:
        if not params:
            return
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        states = [self._state(p) for p in params]
        grads = [p.grad for p in params]
        ms, vs = [s["m"] for s in states], [s["v"] for s in states]
        torch._foreach_mul_(ms, b1)
        torch._foreach_add_(ms, grads, alpha=1 - b1)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - b2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_add_(denom, eps)
        alphas = [-lr * math.sqrt(1 - b2 ** s["step"]) / (1 - b1 ** s["step"]) for s in states]
        torch._foreach_addcdiv_(params, ms, denom, alphas)
        torch._foreach_mul_(params, 1 - lr * wd)


def cosine_lr(t: int, max_lr: float, min_lr: float, warmup_iters: int, cosine_iters: int) -> float:
    """Learning rate at step t: linear warm-up 0 -> max_lr on [0, Tw), cosine max_lr -> min_lr on [Tw, Tc], then min_lr.

    Example: cosine_lr(5, 1.0, 0.1, 10, 110) = 0.5; cosine_lr(60, 1.0, 0.1, 10, 110) = 0.55; cosine_lr(200, ...) = 0.1.
    """
    if t < warmup_iters:
        return t / warmup_iters * max_lr
    if t >= cosine_iters:
        return min_lr
    progress = (t - warmup_iters) / (cosine_iters - warmup_iters)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (max_lr - min_lr)


@torch.no_grad()
def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float, eps: float = 1e-6) -> torch.Tensor:
    """Scale all gradients in place by max_norm / (norm + eps) when their global L2 norm exceeds max_norm.

    Returns the norm before clipping as a 0-d tensor; the decision stays on the device (no host sync per step).
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())  # the norm of per-tensor norms
    scale = torch.where(norm > max_norm, max_norm / (norm + eps), 1.0)
    torch._foreach_mul_(grads, scale.to(grads[0].dtype))
    return norm
