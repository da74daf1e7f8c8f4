"""One way to derive a seed from several integers (run seed, rank, step, batch index), torch-free."""

from __future__ import annotations

SEED_MULTIPLIER = 1_000_003  # a prime a little over 10**6: distinct small parts give distinct seeds


def mix_seed(*parts: int) -> int:
    """Fold parts into one integer: mix_seed(a, b, c) == (a * M + b) * M + c with M = 1_000_003.

    Not reduced: callers that need a bounded seed take it modulo what their generator accepts.
    """
    mixed = 0
    for part in parts:
        mixed = mixed * SEED_MULTIPLIER + part
    return mixed
