"""A stand-in for the round policy in exactness tests: every round a random round type and K."""
from __future__ import annotations

from saguaro.policy import Option, RoundPolicy

BUDGETS = (1, 2, 4, 8)
CS = (1.0, 0.5, 0.3, 0.0)   # Saguaro C's of SSD rounds (0: the top-F tokens never drawn)


class RandomRounds(RoundPolicy):
    """The round policy with its choice replaced by a seeded draw: each round AR (1/4), SD (1/4) or
    SSD (1/2, so that lookups in a cache built the round before are frequent), K uniform in
    1..max_k, either backup, SD drafted by the drafter or by the n-gram guess, a fan-out budget of 1-8, a
    Saguaro C of CS, the target on every core or on its own threads at random, so sequences
    switch round type at every point: after rejections, hits and misses alike; and far from paying
    at random (a new prompt's join deferred), plain steps while the drafter does not know a sequence."""

    def __init__(self, max_k: int, seed: int):
        super().__init__(max_k=max_k, default_k=max_k, budgets=BUDGETS, cs=CS, seed=seed)
        self.max_k = max_k

    def choose(self, seq_ids, batch, wide_ok, drafter_busy=False, cold=False, plain_only=False):
        # far from paying (the drafter following one sequence) at random, so new prompts' joins are
        # deferred and told later (a catch-up, or once no longer far) at every point too
        self.far = self.follows_one = self.rng.random() < 0.3
        # (a sequence the drafter does not know: a plain step, or SD drafted by the n-gram guess)
        kind = self.rng.choice(("ar", "sd")) if plain_only else self.rng.choice(("ar", "sd", "ssd", "ssd"))
        wide = kind != "ssd" and wide_ok and self.rng.random() < 0.5
        # SSD's backup, and SD's drafter (the drafter's, or the decoder's n-gram guess)
        backup = (self.rng.choice(("neural", "fast")) if kind == "ssd"
                  else "fast" if plain_only and kind == "sd" else self.rng.choice(("", "fast")) if kind == "sd" else "")
        budget = self.rng.choice(BUDGETS) if kind == "ssd" else 0
        c = self.rng.choice(CS) if kind == "ssd" else 1.0
        return Option(kind, 0 if kind == "ar" else self.rng.randint(1, self.max_k), wide, backup, budget, c), None
