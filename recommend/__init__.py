"""Stage two: recommenders trained on stored item features (and ID baselines).

A recommender is one item tower (``item_towers``: ID table, TS, TS-DNN, fusion),
one user encoder (``user_encoders``: SASRec, DSSM, GRU4Rec, NextItNet) and one loss
(``losses``), trained by one loop (``trainer``) into a run folder (``run``).
"""

from featurestore import __version__

__all__ = ["__version__"]
