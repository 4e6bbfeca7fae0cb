"""The fast backup speculator (docs/design.md, "Backups"): prompt lookup over the sequence so
far, then the draft's cached top-1 successor of the last token. Near-zero latency, deterministic
proposals (so q is one-hot and verification stays exact)."""
from __future__ import annotations


def ngram_proposal(history: list[int], k: int, top_next: dict[int, int], max_n: int = 3) -> list[int]:
    """K tokens: what followed the longest earlier occurrence of the history's last n tokens,
    continued with the draft's remembered top-1 next token of each last token."""
    out: list[int] = []
    for n in range(min(max_n, len(history) - 1), 0, -1):
        suffix = history[-n:]
        for start in range(len(history) - n - 1, -1, -1):   # most recent earlier occurrence first
            if history[start:start + n] == suffix:
                out = history[start + n:start + n + k]
                break
        if out:
            break
    last = out[-1] if out else history[-1]
    while len(out) < k:
        last = top_next.get(last, last)
        out.append(last)
    return out


def matched_prefix(proposal: list[int], emitted: list[int]) -> int:
    """How many leading proposal tokens the target would have accepted, given what it emitted."""
    n = 0
    while n < min(len(proposal), len(emitted)) and proposal[n] == emitted[n]:
        n += 1
    return n
