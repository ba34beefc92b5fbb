"""The seeds of each epoch's random streams, from (seed, epoch[, rank]) alone, so a resumed run
draws exactly what an uninterrupted one would have drawn from that epoch on."""


def rank_seed(seed: int, epoch: int, rank: int, bits: int = 63) -> int:
    """A stream of each rank's own: negatives, dropout, the loader's row shuffle."""
    return (seed * 1_000_003 + epoch * 7919 + rank) % 2**bits


def shared_seed(seed: int, epoch: int, bits: int = 63) -> int:
    """One stream for every rank: the order of the train files, the users of user-row models."""
    return (seed * 7919 + epoch) % 2**bits
