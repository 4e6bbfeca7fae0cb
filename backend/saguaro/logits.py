"""NVIDIA TensorRT-LLM's logits processing of the target: penalties, min_tokens and bad words
(docs/design.md, "Penalties, bad words and log-probabilities").

`process` turns the target's raw logits rows of one round, [pending, d1..dK] -> K+1 rows, into the
logits TensorRT-LLM samples from; row i is processed with its own context: the prompt, the output so
far and the draft tokens d1..di before it, so a verified row gets exactly the distribution that plain
decoding would give at that position. Semantics and order, as TensorRT-LLM's decoder runs them
(the penalty layer first, then the ban-words layer, then sampling: cpp/tensorrt_llm/layers/
layersFactory.h @ c629546ce429623c8a163633095230154a6f0574):

1. temperature: logit / T (TensorRT-LLM multiplies by 1 / (T + 1e-6); we divide by T as
   `sampling.probs` always has). Greedy requests are processed at T = 1, TensorRT-LLM's default.
2. penalties, on the temperature-scaled logit of every token that occurs in the context, prompt
   included, counted once per occurrence: repetition (x < 0 ? x * r : x / r), then presence (x - p),
   then frequency (x - f * count). cpp/tensorrt_llm/kernels/penaltyKernels.cu, `batchApplyPenalty`,
   @ 249d93d551e8ec11d6d62aabfc9ca8df41ead84c (the context phase counts all input tokens, each
   generation step adds the last token; newer releases add `promptIgnoreLength`, default 0, which
   keeps this behaviour).
3. min_tokens: end_id gets -FLT_MAX while fewer than min_tokens tokens have been generated (the
   prompt does not count; only end_id is banned, never stop words). Same kernel. Unlike
   TensorRT-LLM, a request that does not set min_tokens never has end_id banned (there a request
   without it gets the default 1 whenever another request in its batch sets it).
4. bad words: a one-token word is always banned; a longer one bans its last token where the
   context (prompt included) ends with the rest of it. The banned logit is -inf.
   cpp/tensorrt_llm/kernels/banBadWords.cu @ 829d3e2c34c797674f113b255ccc6dc6d119ee44.

Tokens beyond the rows' vocabulary are neither counted nor banned, as upstream. Requests that set
none of these skip the module entirely (`active`).
"""
from __future__ import annotations

import numpy as np
import torch

from saguaro.config import FLOAT32_MAX, MIN_TEMPERATURE, SamplingParams

# The largest penalized logit (the logits are scaled by the temperature before): its softmax's
# differences stay finite, with room to spare for a further division by the smallest temperature.
# Without it a repetition penalty of 1e-45 or a frequency penalty of -3e38 made logits inf,
# probabilities NaN, a garbage draw, and a NaN p(x) that the drafter refused, which turned
# speculation off for every request in flight.
LOGIT_BOUND = FLOAT32_MAX * MIN_TEMPERATURE / 4

MIN_LENGTH_MASK = float(np.finfo(np.float32).min)   # TensorRT-LLM's MASK_VAL for end_id: -FLT_MAX


def active(p: SamplingParams) -> bool:
    """Whether the request changes the target's logits at all."""
    return (p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
            or (p.min_tokens > 0 and p.end_id is not None) or bool(p.bad_words))


def process(rows: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int],
            draft: list[int]) -> torch.Tensor:
    """rows: [n, V] raw target logits, row i following prompt + output + draft[:i] (n <= len(draft)
    + 1). Returns float32 [n, V] on the rows' device: scaled by the temperature (1 for greedy) and
    processed; softmax of it is the target's distribution, its argmax the greedy token. Through numpy
    (float32, as upstream): a round's few rows cost a few microseconds an operation there, tens in
    torch."""
    x = rows.detach().float().cpu().numpy() / np.float32(1.0 if p.greedy else p.temperature)
    n, vocab = x.shape
    if p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
        _penalize(x, p, prompt + output, draft[: n - 1])
    if p.end_id is not None and 0 <= p.end_id < vocab:
        x[[i for i in range(n) if len(output) + i < p.min_tokens], p.end_id] = MIN_LENGTH_MASK
    if p.bad_words:
        tail = _tail(prompt, output, max(len(w) for w in p.bad_words) - 1)
        cells = [(i, t) for i in range(n) for t in banned(tail + draft[:i], p.bad_words) if 0 <= t < vocab]
        x[[i for i, _ in cells], [t for _, t in cells]] = -np.inf
    return torch.from_numpy(x).to(rows.device)


def _penalize(x: np.ndarray, p: SamplingParams, context: list[int], draft: list[int]) -> None:
    """Repetition, presence and frequency penalties, in place, on every row at once: row i on the
    tokens of context + draft[:i], with their counts (a penalty at its neutral value is skipped: it
    would leave the logit as it is)."""
    n, vocab = x.shape
    ids, column = np.unique(np.array(context + draft, dtype=np.int64), return_inverse=True)
    counts = np.tile(np.bincount(column[: len(context)], minlength=len(ids)).astype(np.float32), (n, 1))
    for i, col in enumerate(column[len(context):], start=1):     # row i also counts d1..di
        counts[i:, col] += 1
    if ids[-1] >= vocab:
        keep = ids < vocab
        ids, counts = ids[keep], counts[:, keep]
    v = x[:, ids]
    penalized = v
    with np.errstate(over="ignore"):        # each step bounded: an extreme penalty gives a huge
        if p.repetition_penalty != 1.0:     # logit, never inf or NaN (LOGIT_BOUND)
            r = np.float32(p.repetition_penalty)
            penalized = np.clip(np.where(v < 0, v * r, v / r), -LOGIT_BOUND, LOGIT_BOUND)
        if p.presence_penalty != 0.0:
            penalized = np.clip(penalized - np.float32(p.presence_penalty), -LOGIT_BOUND, LOGIT_BOUND)
        if p.frequency_penalty != 0.0:
            penalized = np.clip(penalized - np.float32(p.frequency_penalty) * counts, -LOGIT_BOUND, LOGIT_BOUND)
    x[:, ids] = np.where(counts > 0, penalized, v)


def banned(context: list[int], bad_words: tuple[tuple[int, ...], ...]) -> list[int]:
    """The tokens the bad words forbid next after context: each word's last token where context ends
    with the word's other tokens (a one-token word: always)."""
    out = []
    for w in bad_words:
        n = len(w) - 1
        if n == 0 or (len(context) >= n and tuple(context[-n:]) == tuple(w[:-1])):
            out.append(w[-1])
    return out


def _tail(prompt: list[int], output: list[int], n: int) -> list[int]:
    """The last n tokens of prompt + output, without building the whole list."""
    if n <= 0:
        return []
    if len(output) >= n:
        return output[-n:]
    return prompt[max(0, len(prompt) - (n - len(output))):] + output
