"""One epoch-seed scheme for every training loop (recommenders, encoder adaptation).

A resumed run must draw exactly what an uninterrupted one draws, so an epoch's randomness
(shuffling, negatives, masks, dropout) is reseeded from ``(seed, rank, epoch)`` alone, never
carried over from earlier epochs. ``numpy.random.SeedSequence`` mixes the three numbers so
that neighbouring ranks and epochs get unrelated streams (a linear ``seed * K + epoch``
makes ``(seed, epoch + K)`` collide with ``(seed + 1, epoch)``).
"""

from __future__ import annotations

import numpy as np


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """The torch seed of process ``rank``'s epoch ``epoch`` of a run seeded with ``seed``.

    Example:
        >>> torch.manual_seed(epoch_seed(42, procs.rank, epoch))
    """
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])
