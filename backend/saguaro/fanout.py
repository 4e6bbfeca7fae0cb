"""How to spend the speculation budget (docs/design.md, "Fan-out") and which backup to use ("Backups").

The acceptance rate a and the power-law exponent r (1 - p_hit(F) = F^-r) are fitted online from
observed rounds, with exponential forgetting so the fit follows the text being generated.
"""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np


def _round_to_budget(weights: list[float], budget: int) -> list[int]:
    """Integers >= 0 proportional to weights, summing to budget (largest remainder)."""
    total = sum(weights)
    exact = [budget * w / total for w in weights]
    out = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: out[i] - exact[i])
    for i in by_remainder[: budget - sum(out)]:
        out[i] += 1
    return out


def geometric_fanout(budget: int, k: int, a: float, r: float) -> list[int]:
    """F_0..F_K maximizing sum_k P(k)(1 - F_k^-r) s.t. sum F_k = B under capped-geometric
    acceptance P(k) = (1-a) a^k (k < K), P(K) = a^K."""
    a = min(max(a, 1e-3), 1 - 1e-3)
    w = [a ** (j / (1 + r)) for j in range(k + 1)]
    w[k] *= (1 - a) ** (-1 / (1 + r))
    return _round_to_budget(w, budget)


def uniform_fanout(budget: int, k: int) -> list[int]:
    return _round_to_budget([1.0] * (k + 1), budget)


def expected_tokens(a: float, k: int) -> float:
    """E = (1 - a^(K+1)) / (1 - a): tokens per round, bonus included."""
    return k + 1.0 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)


def backup_threshold(p_hit: float, a_neural: float, a_fast: float, t_primary: float, t_neural: float, t_fast: float) -> float:
    """b*: the largest batch for which the neural backup beats the fast one (Thm 17; times in
    units of one verify). A_x = expected tokens per round with backup x; returns inf when neural
    always wins and 0 when fast always wins."""
    delta = a_neural - a_fast
    gain = a_fast * (1 + t_neural) - a_neural * (1 + t_fast)
    m = max(1.0, t_primary)
    if gain <= 0:
        return math.inf if delta >= 0 else 0.0
    if delta <= 0 or p_hit <= 0:
        return 0.0
    if p_hit >= 1:
        return math.inf
    return math.log(gain / (gain + m * delta)) / math.log(p_hit)


class FanoutFit:
    """Online estimates of a (draft acceptance), r (cache power law) and the fast backup's
    acceptance, and the fan-out they imply."""

    R_GRID = np.linspace(0.05, 3.0, 60)

    def __init__(self, a: float | None = None, r: float | None = None, decay: float = 0.995):
        self.fixed_a, self.fixed_r, self.decay = a, r, decay
        self.accepted = self.rejected = 0.0          # per-token acceptance counts
        self.fast_accepted = self.fast_rejected = 0.0
        self.hits: dict[int, float] = defaultdict(float)    # by fan-out F of the outcome's k
        self.misses: dict[int, float] = defaultdict(float)

    def observe_accept(self, k: int, max_k: int) -> None:
        """A round verified a draft speculation and accepted k of its max_k tokens."""
        d = self.decay
        self.accepted, self.rejected = self.accepted * d + k, self.rejected * d + (k < max_k)

    def observe_cache(self, fanout: int, hit: bool) -> None:
        """The outcome's accepted length had `fanout` cached branches; was the bonus among them?"""
        if fanout == 0:   # nothing was cached for this k: says nothing about r
            return
        for table in (self.hits, self.misses):
            for f in table:
                table[f] *= self.decay
        (self.hits if hit else self.misses)[fanout] += 1

    def observe_fast(self, k: int, max_k: int) -> None:
        """Shadow-score the n-gram proposal against what the target actually emitted."""
        d = self.decay
        self.fast_accepted, self.fast_rejected = self.fast_accepted * d + k, self.fast_rejected * d + (k < max_k)

    @property
    def a(self) -> float:
        if self.fixed_a is not None:
            return self.fixed_a
        return (self.accepted + 1) / (self.accepted + self.rejected + 2)   # Laplace prior at 1/2

    @property
    def a_fast(self) -> float:
        return (self.fast_accepted + 0.5) / (self.fast_accepted + self.fast_rejected + 2)

    @property
    def r(self) -> float:
        if self.fixed_r is not None:
            return self.fixed_r
        fs = [f for f in set(self.hits) | set(self.misses) if f > 1]
        if sum(self.hits[f] + self.misses[f] for f in fs) < 8:
            return 0.8                                          # until there is evidence
        F = np.array(fs, dtype=float)[:, None]
        h = np.array([self.hits[f] for f in fs])[:, None]
        m = np.array([self.misses[f] for f in fs])[:, None]
        miss_p = np.clip(F ** -self.R_GRID[None, :], 1e-9, 1 - 1e-9)
        loglik = (m * np.log(miss_p) + h * np.log1p(-miss_p)).sum(0)
        return float(self.R_GRID[loglik.argmax()])

    def fanout(self, budget: int, k: int, kind: str) -> list[int]:
        return geometric_fanout(budget, k, self.a, self.r) if kind == "geometric" else uniform_fanout(budget, k)
