"""Distributions, Saguaro reshaping and exact verification (docs/design.md, "The round",
"Saguaro sampling").

The one rule that keeps speculative sampling exact: the q handed to `verify` must be the very
distribution each draft token was drawn from. Every drafter in this package samples through
`sample` on a distribution built here and returns that distribution with its tokens.
"""
from __future__ import annotations

import numpy as np
import torch

from saguaro.config import SamplingParams


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim (the first of equal maxima, as torch's). On CPU through numpy:
    torch's row-wise argmax costs ~6 us per 4k-vocab row here, numpy's ~0.3 us, and a round takes
    several (the verify, the draft's glue and every branch depth)."""
    if logits.device.type != "cpu":
        return logits.argmax(-1)
    return torch.from_numpy(np.asarray(logits.float().numpy().argmax(-1)))


def probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution we promise to sample from: softmax(logits / T) restricted by top-k and
    top-p (applied to the target before verification, and to the draft alike). Rows are [.., V]."""
    return distribution(logits.float() / p.temperature, p)


def distribution(x: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """softmax of logits already scaled by the temperature (and processed: logits.process),
    restricted by top-k and top-p."""
    if p.top_k and p.top_k < x.shape[-1]:
        kth = x.topk(p.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    out = x.softmax(-1)
    if p.top_p < 1.0:
        sorted_p, order = out.sort(-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it stays)
        drop_sorted = sorted_p.cumsum(-1) - sorted_p >= p.top_p
        out = out.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), 0.0)
        out = out / out.sum(-1, keepdim=True)
    return out


def probability(p: torch.Tensor, token: int) -> float:
    """p[0, token] as a float: on CPU through numpy (1.2 us a read here, 2.9 through torch's
    indexing; a sampled plain step reads one for the drafter every round, per sequence)."""
    return float(p.numpy()[0, token]) if p.device.type == "cpu" else float(p[0, token])


def token_log_probs(x: torch.Tensor, tokens: list[int]) -> list[float]:
    """log softmax(x[i])[tokens[i]] for the first len(tokens) rows of x: TensorRT-LLM's
    output_log_probs, the log-probability under the whole vocabulary of the scaled, processed
    logits, before top-k/top-p (not renormalized over what they keep): the top-k kernel takes
    log(prob) of the softmax that the sampling layer computes whenever log-probs are asked for
    (cpp/tensorrt_llm/kernels/samplingTopKKernels.cu, "NOT normalized (same way as OpenAI does)",
    and cpp/tensorrt_llm/layers/samplingLayer.cpp, both @ 03961722f65265573cad179baca3bc5fe8c03f76)."""
    rows = x[: len(tokens)].float().log_softmax(-1)
    return rows[torch.arange(len(tokens)), torch.tensor(tokens, dtype=torch.long)].tolist()


def saguaro(q: torch.Tensor, fanout: int, c: float) -> torch.Tensor:
    """sigma_{F,C}: scale the top-F tokens' mass by C and renormalize (docs/design.md, "Saguaro
    sampling"). Lower q on the tokens the cache will hold raises the residual there, so bonus
    tokens land in the cache."""
    if c >= 1.0 or fanout <= 0:
        return q
    top = q.topk(min(fanout, q.shape[-1]), dim=-1).indices
    scaled = q.scatter(-1, top, q.gather(-1, top) * c)
    total = scaled.sum(-1, keepdim=True)
    # C = 0 on a distribution with all its mass in the top-F would leave nothing: keep q there.
    return torch.where(total > 0, scaled / total.clamp_min(1e-30), q)


def sample(dist: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of a [N, V] (possibly unnormalized) distribution, by inverse CDF: exact,
    and on CPU an order of magnitude cheaper than torch.multinomial for a full vocabulary."""
    return sample_rows(dist, [(generator, dist.shape[0])])


def sample_rows(dist: torch.Tensor, draws: list[tuple[torch.Generator | None, int]]) -> torch.Tensor:
    """`sample` over consecutive blocks of rows, each block drawing from its own generator (one
    sequence's rows in a batch): the same draws as `sample` per block, one inverse CDF for all."""
    cdf = dist.cumsum(-1)
    u = torch.cat([torch.rand(n, 1, generator=g, dtype=cdf.dtype) for g, n in draws]) * cdf[:, -1:]
    # right=True: the first token whose CDF exceeds u, so zero-probability tokens are never drawn
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_max(dist.shape[-1] - 1)


def one_hot(tokens: list[int], vocab: int) -> torch.Tensor:
    """q of a deterministic proposal (n-gram backup): all mass on the proposed token."""
    q = torch.zeros(len(tokens), vocab)
    q[torch.arange(len(tokens)), torch.tensor(tokens, dtype=torch.long)] = 1.0
    return q


def verify_greedy(best: list[int], draft: list[int]) -> tuple[int, int]:
    """best: the target's argmax ids over [t, d1..dK]. Returns (accepted k, bonus token)."""
    k = 0
    while k < len(draft) and draft[k] == best[k]:
        k += 1
    return k, best[k]


def verify_sampled(p: torch.Tensor, q: torch.Tensor, draft: list[int], generator: torch.Generator | None) -> tuple[int, int]:
    """Exact rejection sampling. p [K+1, V]: target distributions; q [K, V]: the distributions the
    draft tokens were drawn from. Accept d_i with prob min(1, p/q); on the first rejection draw the
    bonus from norm(max(0, p - q)); if all are accepted draw it from p_K."""
    if draft:
        idx = torch.arange(len(draft))
        d = torch.tensor(draft, dtype=torch.long)
        ratio = p[idx, d] / q[idx, d]
        u = torch.rand(len(draft), generator=generator)
        rejected = (u >= ratio).nonzero()
        if len(rejected):
            k = int(rejected[0])
            residual = (p[k] - q[k]).clamp_min(0.0)
            # p == q leaves no residual; then a rejection had probability 0 and p is the answer
            residual = residual if residual.sum() > 0 else p[k]
            return k, int(sample(residual[None], generator)[0])
    return len(draft), int(sample(p[len(draft)][None], generator)[0])
