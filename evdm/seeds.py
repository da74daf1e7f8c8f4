"""Every derived seed, from one integer mixer: distinct, reproducible streams per (seed, rank, step). Torch-free."""

SEED_MULTIPLIER = 1_000_003  # a prime a little over 10**6: distinct small parts give distinct seeds
VAL_SEED = 1234  # fixed noise and timesteps for every validation


def mix_seed(*parts: int) -> int:
    """mix_seed(a, b, c) == (a * M + b) * M + c, M = SEED_MULTIPLIER; callers reduce it for their generator."""
    mixed = 0
    for part in parts:
        mixed = mixed * SEED_MULTIPLIER + part
    return mixed


def step_seed(seed: int, rank: int, step: int) -> int:
    """Per-step seed from (seed, rank, step), so a resumed run draws the same noise as a straight one."""
    return mix_seed(seed, rank, step) % (2**63)
