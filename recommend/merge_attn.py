"""Merge-attention fusion: one Transformer block over both modalities' tokens (``--fusion merge-attn``).

PMMRec (paper 002, Sec. III-B3, Eq. 3) and MMSR (paper 003, Table 3: "MergeAttn-1",
their strongest fusion) do not fuse two pooled vectors: they concatenate the text
tokens and the image patches, prepend a learned multi-modal [CLS], run ONE
Transformer block over the whole sequence and keep the [CLS] output as the item
vector. Every token can then attend to every patch, which the coarse fusions
(concat/sum/gate/film of pooled vectors) cannot express.

What it reads: per item, the states LEAVING each encoder's last block, before
pooling, stored by ``featurestore extract --cache-layer 0`` in the group's ``cache``
array (:mod:`extract.cache`); batches gather only their distinct items from the
memory-mapped chunks, so memory never holds the catalogue.

The tower, per modality in group order:

- each token state goes through the mode's own projection to ``d``: ``ts``, the DT
  layer ``Linear(width -> d)``; ``ts-dnn``, the TS-DNN-N stack applied per token
  (the same layers as without fusion, so ``--layers`` means the same depth);
- plus a learned modality-type embedding (text and image tokens share a width
  after projection; the type tells them apart). No position embedding: the
  encoder's states already carry their positions;
- then ``[CLS; tokens of group 1; tokens of group 2]`` through one
  ``nn.TransformerEncoderLayer`` (4d GELU feed-forward, as the SASRec backbone) with
  a key padding mask, and the [CLS] state is the item vector. The block is pre-LN:
  a post-LN block ends in a LayerNorm, so every item vector would start with norm
  sqrt(d) and the first epochs' inner-product logits saturate (synthetic HM, d = 64,
  ts-dnn-2, 3 epochs: first-epoch BCE 10.4 post-LN vs 2.6 pre-LN, best HR@10 0.55
  vs 0.67).

Masked keys: text padding after an item's real tokens, and every token of a
modality the item lacks (``present = false``: no picture, empty text). [CLS] is
always there, so an item without any content gets one learned vector (the role of
the TS towers' "missing" vector). Unlike PMMRec, the encoders' own [CLS]/[SEP]
tokens stay in the sequence: they are states like any other, and dropping them
would need per-family knowledge of which position is special.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from extract.cache import StateCache
from featurestore.errors import UserError
from recommend.features import FeatureSource
from recommend.item_towers import TOKEN_FUSIONS, ItemTower, _xavier_init

MERGE_HEADS = 2  # attention heads of the fusion block (the backbones' default --heads)
ITEM_BATCH = 256  # items per fusion call when listing the catalogue (bounds the gathered states)


class MergeAttentionTower(ItemTower):
    """Item ids -> token states of two groups -> one Transformer block -> the fusion [CLS] state.

    Args:
        states: per group, its final-layer states (``sequence``, ``present``, ``token_width``).
        n_items: catalogue size N (ids 1..N).
        dim: recommender width d (divisible by ``heads``).
        projection: ``(token_width, d) -> module`` applied to every token of a group.
        dropout: dropout inside the fusion block.
        heads: attention heads of the fusion block.
        item_batch: items per fusion call without gradients (listing the catalogue).
    """

    def __init__(self, states: Sequence[StateCache], n_items: int, dim: int,
                 projection: Callable[[int, int], nn.Module], dropout: float = 0.1, heads: int = MERGE_HEADS,
                 item_batch: int = ITEM_BATCH) -> None:
        super().__init__()
        if dim % heads:
            raise UserError(f"--fusion merge-attn splits --dim {dim} into {heads} attention heads; "
                            f"choose a --dim divisible by {heads}")
        self.n_items, self.dim = n_items, dim
        self.states = list(states)  # readers of the store, not modules: nothing of them is saved
        self.item_batch = item_batch
        self.projections = nn.ModuleList(projection(s.token_width, dim) for s in self.states)
        self.modality = nn.Embedding(len(self.states), dim)
        self.cls = nn.Parameter(torch.empty(1, dim))
        self.block = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, activation="gelu",
                                                batch_first=True, norm_first=True)
        _xavier_init(self.projections)
        _xavier_init(self.modality)
        nn.init.xavier_normal_(self.cls)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``(..., d)`` for ids of any shape: each distinct id fused once (without gradients,
        ``item_batch`` at a time)."""
        unique, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        parts = unique.split(self.item_batch) if not torch.is_grad_enabled() else (unique,)
        fused = torch.cat([self.fuse(part) for part in parts])
        return fused[inverse].reshape(*ids.shape, self.dim)

    def fuse(self, ids: torch.Tensor) -> torch.Tensor:
        """``(P, d)`` for P distinct ids: their stored token states, masked, through :meth:`merge`."""
        device = self.cls.device
        rows = ids.cpu().numpy()
        sequences = []
        for states in self.states:
            tokens, valid = states.sequence(rows)
            valid &= torch.from_numpy(np.asarray(states.present[rows], dtype=bool)).unsqueeze(1)
            sequences.append((tokens.to(device), valid.to(device)))
        return self.merge(sequences)

    def merge(self, sequences: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """``[CLS; projected tokens + type]`` of every group through the block -> ``(P, d)`` [CLS] states.

        Args:
            sequences: per group, token states ``(P, T_g, width_g)`` and their
                validity ``(P, T_g)`` bool (False: padding or absent modality).
        """
        count = len(sequences[0][0])
        tokens = [self.cls.expand(count, 1, self.dim)]
        keep = [torch.ones(count, 1, dtype=torch.bool, device=self.cls.device)]
        for index, ((states, valid), project) in enumerate(zip(sequences, self.projections)):
            tokens.append(project(states) + self.modality.weight[index])
            keep.append(valid)
        return self.block(torch.cat(tokens, dim=1), src_key_padding_mask=~torch.cat(keep, dim=1))[:, 0]


@TOKEN_FUSIONS.register("merge-attn")
def merge_attention_tower(spec: dict, sources: Sequence[FeatureSource],
                          projection: Callable[[int, int], nn.Module]) -> MergeAttentionTower:
    """The ``--fusion merge-attn`` tower over two groups' final-layer states.

    ``sources`` are the run's :class:`recommend.features.FeatureSource` groups (two, as
    ``check_options`` requires of a fusion); each opens its states (refusing, with the
    extraction command, a group without them), and the run's config records which
    state arrays were read.
    """
    return MergeAttentionTower([source.final_states() for source in sources], spec["n_items"], spec["dim"],
                               projection, dropout=float(spec.get("dropout", 0.1)))
