"""The fast backup speculator (docs/design.md, "Backups"): prompt lookup over the sequence so
far, then the draft's cached top-1 successor of the last token. Near-zero latency, deterministic
proposals (so q is one-hot and verification stays exact)."""
from __future__ import annotations

from array import array


def ngram_proposal(history: list[int] | array, k: int, top_next: dict[int, int], max_n: int = 3) -> list[int]:
    """K tokens: what followed the longest earlier occurrence of the history's last n tokens (the
    most recent one), continued with the draft's remembered top-1 next token of each last token."""
    out = ngram_lookup(history, k, max_n)
    last = out[-1] if out else history[-1]
    while len(out) < k:
        last = top_next.get(last, last)
        out.append(last)
    return out


def ngram_lookup(history: list[int] | array, k: int, max_n: int = 3) -> list[int]:
    """Up to K tokens that followed the most recent earlier occurrence of the history's last n
    tokens, n from max_n down to 1 (none: []). The search runs over the history's bytes (one machine
    word per token): the decoder guesses on its own critical path, and a Python scan of 800 tokens
    without a match took ~350 us. A caller that guesses every round keeps the history as an
    array("I") (no conversion)."""
    tokens = history if isinstance(history, array) else array("I", history)
    w, buf = tokens.itemsize, tokens.tobytes()
    end = (len(history) - 1) * w            # an occurrence ends before the last token
    for n in range(min(max_n, len(history) - 1), 0, -1):
        pattern = buf[-w * n:]
        at = buf.rfind(pattern, 0, end)
        while at > 0 and at % w:            # a match across token boundaries is none
            at = buf.rfind(pattern, 0, at + w * n - 1)
        if at >= 0 and at % w == 0:
            start = at // w
            return tokens[start + n:start + n + k].tolist()
    return []


def matched_prefix(proposal: list[int], emitted: list[int]) -> int:
    """How many leading proposal tokens the target would have accepted, given what it emitted."""
    n = 0
    while n < min(len(proposal), len(emitted)) and proposal[n] == emitted[n]:
        n += 1
    return n
