"""Losses: sampled negatives stay outside the sequence; both losses match a reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featurestore.cliutil import UserError
from recommend.losses import LossContext, create_loss, list_losses, sample_negatives


def test_sampled_negatives_are_never_in_the_users_sequence_and_cover_the_rest():
    torch.manual_seed(0)
    n_items = 25
    sequence = torch.tensor([
        [0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8],
        [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 9, 9],
    ])
    seen = [set() for _ in range(len(sequence))]
    for _ in range(300):
        negatives = sample_negatives(sequence, n_items)
        assert negatives.shape == (3, 10)
        for row, negs in enumerate(negatives.tolist()):
            assert not set(negs) & set(sequence[row].tolist())
            assert all(1 <= n <= n_items for n in negs)
            seen[row].update(negs)
    for row in range(len(sequence)):  # every allowed item does get drawn (uniform over the rest)
        allowed = set(range(1, n_items + 1)) - set(sequence[row].tolist())
        assert seen[row] == allowed


def test_negatives_are_uniform_over_the_complement():
    torch.manual_seed(1)
    sequence = torch.tensor([[0, 1, 2, 3, 4, 5]]).repeat(4000, 1)
    draws = sample_negatives(sequence, 10).flatten().numpy()
    counts = np.bincount(draws, minlength=11)[1:]
    assert counts[:5].sum() == 0
    expected = len(draws) / 5
    assert np.all(np.abs(counts[5:] - expected) < 0.05 * expected)


def _inputs(seed: int = 0, n_items: int = 30, rows: int = 4, width: int = 6, dim: int = 8):
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(n_items + 1, dim, generator=gen)
    sequence = torch.randint(1, n_items + 1, (rows, width + 1), generator=gen)
    sequence[0, :3] = 0
    sequence[1, :1] = 0
    hidden = torch.randn(rows, width, dim, generator=gen)
    return table, sequence, hidden


def _loss(loss_fn, table, sequence, hidden):
    """Call a loss the way the trainer does: extras embedded by the same table."""
    extra = loss_fn.extra_items(sequence)
    return loss_fn(hidden, sequence, table[sequence], extra, None if extra is None else table[extra])


def test_bce_is_the_papers_formula():
    table, sequence, hidden = _inputs()
    loss_fn = create_loss("bce", LossContext(30, np.ones(31)))
    torch.manual_seed(5)
    loss = _loss(loss_fn, table, sequence, hidden)
    torch.manual_seed(5)
    negatives = sample_negatives(sequence, 30)
    valid = (sequence[:, :-1] > 0).numpy()
    h, pos, neg = hidden.numpy(), table[sequence[:, 1:]].numpy(), table[negatives].numpy()
    pos_logit, neg_logit = (h * pos).sum(-1)[valid], (h * neg).sum(-1)[valid]
    reference = np.mean(np.log1p(np.exp(-pos_logit))) + np.mean(np.log1p(np.exp(neg_logit)))
    assert loss.item() == pytest.approx(reference, rel=1e-5)


def test_inbatch_softmax_matches_a_reference_with_log_popularity():
    table, sequence, hidden = _inputs(seed=3)
    counts = np.random.default_rng(0).integers(1, 50, size=31)
    loss_fn = create_loss("inbatch", LossContext(30, counts))
    assert loss_fn.extra_items(sequence) is None  # candidates come from the batch itself
    loss = _loss(loss_fn, table, sequence, hidden).item()

    terms = []
    candidates = sorted(set(sequence[:, 1:][sequence[:, :-1] > 0].tolist()))
    for b in range(sequence.shape[0]):
        for t in range(sequence.shape[1] - 1):
            if sequence[b, t] == 0:
                continue
            target = int(sequence[b, t + 1])
            others = [c for c in candidates if c == target or c not in sequence[b].tolist()]
            logits = np.array([float(hidden[b, t] @ table[c]) - np.log(counts[c]) for c in others])
            terms.append(np.logaddexp.reduce(logits) - logits[others.index(target)])
    assert loss == pytest.approx(np.mean(terms), rel=1e-5)


def test_inbatch_gradient_reaches_every_candidate_vector():
    table, sequence, hidden = _inputs(seed=2)
    table.requires_grad_(True)
    _loss(create_loss("inbatch", LossContext(30, np.ones(31))), table, sequence, hidden).backward()
    targets = set(sequence[:, 1:][sequence[:, :-1] > 0].tolist())
    assert {int(i) for i in torch.nonzero(table.grad.abs().sum(1)).flatten()} >= targets


def test_inbatch_is_safe_for_items_never_seen_in_training():
    table, sequence, hidden = _inputs(seed=4)
    loss = _loss(create_loss("inbatch", LossContext(30, np.zeros(31))), table, sequence, hidden)
    assert torch.isfinite(loss)
    loss_ones = _loss(create_loss("inbatch", LossContext(30, np.ones(31))), table, sequence, hidden)
    assert loss.item() == pytest.approx(loss_ones.item())  # count 0 is treated as 1


@pytest.mark.parametrize("name", list_losses())
def test_losses_ignore_padding_positions(name):
    table, sequence, hidden = _inputs(seed=6)
    loss_fn = create_loss(name, LossContext(30, np.ones(31)))
    torch.manual_seed(0)
    base = _loss(loss_fn, table, sequence, hidden)
    noisy = hidden.clone()
    noisy[0, :3] += 100.0  # positions whose input is padding
    torch.manual_seed(0)
    assert _loss(loss_fn, table, sequence, noisy).item() == pytest.approx(base.item())


def test_unknown_loss_names_the_known_ones():
    with pytest.raises(UserError, match="unknown loss 'softmax'.*bce.*inbatch"):
        create_loss("softmax", LossContext(30, np.ones(31)))
