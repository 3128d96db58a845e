"""Datasets: raw-format readers, the canonical prepared form, splits and the synthetic generator.

Data flows raw files -> ``data.formats`` readers -> ``data.prepare`` (ids, filters,
truncation) -> a prepared folder read by :class:`data.dataset.PreparedDataset`.
"""
