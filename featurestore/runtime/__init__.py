"""The runtime at the bottom of every job: process groups, the device rule, atomic writes,
resumable checkpoints, epoch seeds and recorded versions, each once.

Extraction, adaptation, training and ranking all run under the same launcher, on the same
devices, and must survive the same kills; one module per job here means they cannot drift
apart. Nothing here imports ``data``, ``extract``, ``recommend`` or ``eval``.
"""
