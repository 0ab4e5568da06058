"""Naive float64 references, written independently of taopd's code: one position at a time."""

from __future__ import annotations

import math

import torch


def probs(logits: torch.Tensor) -> torch.Tensor:
    x = logits.double()
    m = x.max()
    e = torch.exp(x - m)
    return e / e.sum()


def plogq(p: torch.Tensor, q: torch.Tensor) -> float:
    total = 0.0
    for pi, qi in zip(p.tolist(), q.tolist()):
        if pi > 0:
            total += pi * (math.log(qi) if qi > 0 else -math.inf)
    return total


def entropy(logits: torch.Tensor) -> float:
    p = probs(logits)
    return -plogq(p, p)


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return plogq(p, p) - plogq(p, q)


def topk_ids(p: torch.Tensor, k: int) -> list[int]:
    # Highest probability first; ties broken like torch.topk is not guaranteed, so tests use
    # logits without ties in the top-K when they compare sets.
    return torch.topk(p, k).indices.tolist()


def signals(s_logits: torch.Tensor, t_logits: torch.Tensor, k: int, token: int | None = None):
    ps, pt = probs(s_logits), probs(t_logits)
    ss, st = topk_ids(ps, k), topk_ids(pt, k)
    union = sorted(set(ss) | set(st))
    ps_u = torch.tensor([ps[v].item() for v in union], dtype=torch.float64)
    pt_u = torch.tensor([pt[v].item() for v in union], dtype=torch.float64)
    ps_u, pt_u = ps_u / ps_u.sum(), pt_u / pt_u.sum()
    out = {
        "student_entropy": entropy(s_logits),
        "teacher_entropy": entropy(t_logits),
        "reverse_kl": kl(ps, pt),
        "forward_kl": kl(pt, ps),
        "disagreement": kl(pt_u, ps_u),
        "compatibility": sum(pt[v].item() for v in ss),
        "compatibility_lb": sum(pt[v].item() for v in set(ss) & set(st)),
        "overlap": len(set(ss) & set(st)) / k,
    }
    if token is not None:
        out["log_ratio"] = math.log(ps[token].item()) - math.log(pt[token].item())
    return out


def quantile(values: list[float], q: float) -> float:
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def normalize(values: list[float], low=0.05, high=0.95, eps=1e-8) -> list[float]:
    vals = [x if math.isfinite(x) else 0.0 for x in values]
    a, b = quantile(vals, low), quantile(vals, high)
    return [min(max((x - a) / (b - a + eps), 0.0), 1.0) for x in vals]


def loss_value(s_logits, t_logits, kind, token=None, beta=0.5) -> torch.Tensor:
    """Differentiable float64 per-position loss, written directly from the formulas."""
    ls = torch.log_softmax(s_logits.double(), -1)
    lt = torch.log_softmax(t_logits.double(), -1).detach()
    ps, pt = ls.exp(), lt.exp()
    if kind == "reverse_kl":
        return (ps * (ls - lt)).sum()
    if kind == "forward_kl":
        return (pt * (lt - ls)).sum()
    if kind == "jsd":
        m = beta * pt + (1 - beta) * ps
        return beta * (pt * (lt - m.log())).sum() + (1 - beta) * (ps * (ls - m.log())).sum()
    if kind == "pg":
        # surrogate -A·r with r = p_S(y)/sg(p_S(y)) = 1: value -A, gradient -A·∇log p_S(y)
        adv = -(ls[token] - lt[token]).detach()
        return -adv * torch.exp(ls[token] - ls[token].detach())
    raise ValueError(kind)
