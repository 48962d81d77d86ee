"""A per-task iMAML meta-gradient loop, the baseline of ``bench_imaml.py``.

It follows the official iMAML algorithm one task at a time, on flat
parameter vectors: GD on the λ-regularised support loss, then CG on
(I + H/λ) v = ∇L_query with each Hessian-vector product computed by
double backward from a fresh forward pass, scalars handled on the host.
It uses the paper's operator (not the official code's) and, like
``imaml_ext.cg``, stops a task's CG at non-positive curvature, so its result
equals ``imaml_ext.imaml``'s up to rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call


def _named(model, flat):
    out, offset = {}, 0
    for name, p in model.named_parameters():
        out[name] = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    return out


def reference_meta_grad(model, xs, ys, xq, yq, *, lam, inner_steps, inner_lr, cg_steps):
    """Σ_t (I + H_t/λ)⁻¹ ∇_φ L_t(φ_t) for the mean query loss over tasks; returns ``[P]``."""
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    T = xs.shape[0]
    meta = torch.zeros_like(theta)

    for t in range(T):
        def support_loss(phi):
            return F.cross_entropy(functional_call(model, _named(model, phi), (xs[t],)), ys[t])

        phi = theta.clone()
        for _ in range(inner_steps):
            phi.requires_grad_(True)
            (g,) = torch.autograd.grad(support_loss(phi), phi)
            phi = (phi - inner_lr * (g + lam * (phi - theta))).detach()

        phi.requires_grad_(True)
        query = F.cross_entropy(functional_call(model, _named(model, phi), (xq[t],)), yq[t]) / T
        (b,) = torch.autograd.grad(query, phi)

        def matvec(v):
            (g,) = torch.autograd.grad(support_loss(phi), phi, create_graph=True)
            (hv,) = torch.autograd.grad(g @ v, phi)
            return v + hv / lam

        x = torch.zeros_like(b)
        r = b.clone()
        p = r.clone()
        rs = float(r @ r)
        for _ in range(cg_steps):
            Ap = matvec(p)
            pAp = float(p @ Ap)
            if pAp <= 0:  # non-positive curvature: keep the last iterate, as im.cg does
                break
            alpha = rs / pAp
            x += alpha * p
            r -= alpha * Ap
            rs_new = float(r @ r)
            p = r + (rs_new / rs) * p
            rs = rs_new
        meta += x
    return meta
