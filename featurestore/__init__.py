"""The feature store: one Zarr store of frozen item embeddings with provenance.

Stage one of the pipeline writes here (``featurestore extract``); stage two
(``recommend``) reads memory-mapped rows from it. ``workspace`` fixes where
datasets, the store and runs live under one root.
"""

__version__ = "0.1.0"
