"""Losses: sampled negatives stay outside the sequence; both losses match a reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from featurestore.cliutil import UserError
from recommend import chunked_softmax
from recommend.chunked_softmax import MIN_CHUNK
from recommend.features import FeatureSource
from recommend.item_towers import create_item_tower
from recommend.losses import (LOSSES, LossContext, catalogue_vectors, chunked_logsumexp, create_loss, embed_step,
                              list_losses, sample_negatives)
from recommend.trainer import TrainOptions, check_options


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
    """Call a loss the way the trainer does: extras embedded by the same table (a catalogue
    loss gets the whole table)."""
    if loss_fn.catalogue:
        return loss_fn(hidden, sequence, table[sequence], None, table)
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


def _positions(sequence):
    """(row, input position, target id) of every position that counts, in order."""
    return [(b, t, int(sequence[b, t + 1])) for b in range(sequence.shape[0])
            for t in range(sequence.shape[1] - 1) if sequence[b, t] != 0]


def test_ce_is_softmax_over_the_whole_catalogue():
    table, sequence, hidden = _inputs(seed=7)
    loss = _loss(create_loss("ce", LossContext(30, np.ones(31))), table, sequence, hidden).item()
    terms = []
    for b, t, target in _positions(sequence):
        logits = [float(hidden[b, t] @ table[i]) for i in range(1, 31)]  # items 1..N, never padding
        terms.append(np.logaddexp.reduce(logits) - logits[target - 1])
    assert loss == pytest.approx(np.mean(terms), rel=1e-5)


def test_ce_in_chunks_has_the_same_value_and_gradient():
    gen = torch.Generator().manual_seed(8)
    h, items = torch.randn(40, 16, generator=gen), torch.randn(1000, 16, generator=gen)
    grads = []
    for budget in (10**9, 40 * 4 * 64):  # one chunk; chunks of MIN_CHUNK items, rebuilt in backward
        h1, items1 = h.clone().requires_grad_(), items.clone().requires_grad_()
        value = chunked_logsumexp(h1, items1, budget)
        (value * torch.arange(40.0)).sum().backward()
        grads.append((value.detach(), h1.grad, items1.grad))
    for one, chunked in zip(*grads):
        assert torch.allclose(one, chunked, atol=1e-5)
    assert torch.allclose(grads[0][0], torch.logsumexp(h @ items.T, 1), atol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 30.0])  # 30: logits in the thousands, exp overflows unless shifted
def test_chunked_logsumexp_matches_autograd_of_the_plain_loss(scale):
    """The hand-written backward against autograd through ``torch.logsumexp`` of the full
    logits (float64): value, gradient for ``h`` and for ``items``, with a partial last chunk."""
    gen = torch.Generator().manual_seed(13)
    h = (torch.randn(37, 6, generator=gen, dtype=torch.float64) * scale).requires_grad_()
    items = (torch.randn(1000, 6, generator=gen, dtype=torch.float64) * scale).requires_grad_()
    upstream = torch.randn(37, generator=gen, dtype=torch.float64)
    plain = torch.logsumexp(h @ items.T, 1)
    plain_grads = torch.autograd.grad((plain * upstream).sum(), (h, items))
    value = chunked_logsumexp(h, items, budget=37 * 8 * MIN_CHUNK)  # 8 chunks, the last 104 items
    grads = torch.autograd.grad((value * upstream).sum(), (h, items))
    assert torch.allclose(value, plain, rtol=1e-12, atol=1e-9)
    for ours, reference in zip(grads, plain_grads):
        assert torch.allclose(ours, reference, rtol=1e-10, atol=1e-10)


def test_chunked_logsumexp_passes_gradcheck_and_skips_unneeded_gradients():
    gen = torch.Generator().manual_seed(14)
    h = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    items = torch.randn(300, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: chunked_logsumexp(a, b, budget=1), (h, items),
                                    fast_mode=True)  # 3 chunks, the last partial
    frozen = items.detach()
    chunked_logsumexp(h, frozen, budget=1).sum().backward()
    assert frozen.grad is None and h.grad is not None


def test_ce_loss_in_chunks_matches_the_plain_softmax_with_padding(monkeypatch):
    """The ce loss with many small chunks: value and gradients for the hidden states and the
    catalogue table equal those of ``cross_entropy`` over full logits at the real positions;
    padding positions get no gradient."""
    table, sequence, hidden = _inputs(seed=15, n_items=700)
    table, hidden = table.double().requires_grad_(), hidden.double().requires_grad_()
    monkeypatch.setattr(chunked_softmax, "CPU_LOGIT_BYTES", 1)  # chunks of MIN_CHUNK items
    loss = _loss(create_loss("ce", LossContext(700, np.ones(701))), table, sequence, hidden)
    grads = torch.autograd.grad(loss, (hidden, table))
    valid = sequence[:, :-1] > 0
    reference = torch.nn.functional.cross_entropy(hidden[valid] @ table[1:].T, sequence[:, 1:][valid] - 1)
    reference_grads = torch.autograd.grad(reference, (hidden, table))
    assert loss.item() == pytest.approx(reference.item(), rel=1e-12)
    for ours, plain in zip(grads, reference_grads):
        assert torch.allclose(ours, plain, rtol=1e-10, atol=1e-12)
    assert torch.count_nonzero(grads[0][~valid]) == 0 and torch.count_nonzero(grads[1][0]) == 0


class _Model(torch.nn.Module):
    """The two verbs of a Recommender that :func:`embed_step` uses."""

    def __init__(self, tower):
        super().__init__()
        self.item_tower = tower

    def embed(self, ids):
        return self.item_tower(ids) * (ids > 0).unsqueeze(-1)


def _ts_dnn(n_items=57, dim=8, layers=3):
    rows = np.random.default_rng(9).standard_normal((n_items + 1, 12)).astype(np.float32)
    source = FeatureSource(group="t/text/x", rows=rows, present=np.ones(n_items + 1, bool), dim=12,
                           fingerprint="f")
    return create_item_tower({"name": "ts-dnn", "n_items": n_items, "dim": dim, "layers": layers,
                              "dropout": 0.1, "whiten": False}, [source], True)


def test_ce_through_a_content_tower_in_chunks_has_the_exact_gradient():
    """Chunked, checkpointed catalogue vectors give the same loss and parameter gradients as
    one plain forward of the whole catalogue (dropout included: recomputation replays it)."""
    model = _Model(_ts_dnn())
    loss_fn = create_loss("ce", LossContext(57, np.ones(58)))
    gen = torch.Generator().manual_seed(10)
    rows = torch.randint(1, 58, (5, 8), generator=gen)
    rows[0, :4] = 0
    hidden = torch.randn(5, 7, 8, generator=gen)

    def step(table):
        value = loss_fn(hidden, rows, table[rows], None, table)
        model.zero_grad()
        value.backward()
        return value.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    for train_mode in (False, True):
        model.train(train_mode)
        torch.manual_seed(3)
        plain = step(model.embed(torch.arange(58)))
        torch.manual_seed(3)
        vectors, extra, table = embed_step(model, loss_fn, rows)
        assert extra is None and table.shape == (58, 8) and torch.equal(vectors, table[rows])
        torch.manual_seed(3)
        chunked = step(catalogue_vectors(model, chunk=58 if train_mode else 10))
        assert chunked[0] == pytest.approx(plain[0], rel=1e-6)
        for a, b in zip(plain[1], chunked[1]):
            assert torch.allclose(a, b, atol=1e-6)
    assert torch.count_nonzero(table[0]) == 0  # padding is the zero vector


def test_ce_recomputed_chunks_replay_dropout_exactly():
    """With dropout on, each chunk's recomputation in backward draws the masks its forward drew:
    the gradient equals that of the same chunks kept in memory."""
    model = _Model(_ts_dnn()).train()
    ids = torch.arange(58)

    def grads(checkpointed):
        torch.manual_seed(4)
        chunks = [catalogue_vectors(model, chunk=10)] if checkpointed else [
            model.embed(ids[i:i + 10]) for i in range(0, 58, 10)]
        table = torch.cat(chunks)
        model.zero_grad()
        (table ** 2).sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    for a, b in zip(grads(False), grads(True)):
        assert torch.allclose(a, b, atol=1e-6)


def test_ce_on_an_id_table_is_the_table_itself():
    tower = create_item_tower({"name": "id", "n_items": 30, "dim": 8}, [], True)
    table = catalogue_vectors(_Model(tower))
    assert torch.equal(table[1:], tower.table.weight[1:]) and torch.count_nonzero(table[0]) == 0
    table.sum().backward()
    assert torch.equal(tower.table.weight.grad[1:], torch.ones(30, 8))


def test_gbce_is_gsasrecs_formula():
    table, sequence, hidden = _inputs(seed=11)
    k, t, n = 5, 0.75, 30
    loss_fn = create_loss("gbce", LossContext(n, np.ones(n + 1), negatives=k, gbce_t=t))
    torch.manual_seed(12)
    loss = _loss(loss_fn, table, sequence, hidden).item()
    torch.manual_seed(12)
    negatives = sample_negatives(sequence, n, k)
    assert negatives.shape == (4, 6 * k)
    alpha = k / (n - 1)
    beta = alpha * (t * (1 - 1 / alpha) + 1 / alpha)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    terms = []
    for b, pos, target in _positions(sequence):
        h = hidden[b, pos]
        term = -math.log(sigmoid(float(h @ table[target])) ** beta)
        for j in range(k):
            negative = int(negatives[b, pos * k + j])
            assert negative not in sequence[b].tolist()
            term -= math.log(1 - sigmoid(float(h @ table[negative])))
        terms.append(term / (k + 1))
    assert loss == pytest.approx(np.mean(terms), rel=1e-5)


def test_gbce_calibration_ends():
    """t = 0 is plain BCE over K negatives (beta = 1); t = 1 gives beta = alpha = K / (N - 1)."""
    plain = create_loss("gbce", LossContext(30, np.ones(31), negatives=4, gbce_t=0.0))
    full = create_loss("gbce", LossContext(30, np.ones(31), negatives=4, gbce_t=1.0))
    assert plain.beta == pytest.approx(1.0) and full.beta == pytest.approx(4 / 29)
    with pytest.raises(UserError, match="--negatives 30"):
        create_loss("gbce", LossContext(30, np.ones(31), negatives=30))


def test_sce_is_the_target_against_shared_corrected_negatives():
    """Hand reference: each real position's softmax over its target and the batch's K draws,
    every draw's logit raised by log(N / K), a draw equal to the target left out."""
    table, sequence, hidden = _inputs(seed=16, n_items=12)
    n = 12  # 11 draws from 12 items: the target is drawn (and left out) at most positions
    loss_fn = create_loss("sce", LossContext(n, np.ones(n + 1), negatives=11))
    torch.manual_seed(17)
    loss = _loss(loss_fn, table, sequence, hidden).item()
    torch.manual_seed(17)
    draws = loss_fn.extra_items(sequence)
    assert draws.shape == (1, 11) and draws.min() >= 1 and draws.max() <= n
    terms = []
    for b, t, target in _positions(sequence):
        h = hidden[b, t]
        logits = [float(h @ table[target])] + [float(h @ table[d]) + math.log(n / 11)
                                               for d in draws[0].tolist() if d != target]
        terms.append(np.logaddexp.reduce(logits) - logits[0])
    assert loss == pytest.approx(np.mean(terms), rel=1e-5)


def test_sce_normaliser_is_an_unbiased_estimate_of_the_catalogues():
    """With the logQ correction, exp(sampled logsumexp) averages to ce's full normaliser
    (without it, it would be K / N of it): the loss is ce's estimate, not another objective."""
    gen = torch.Generator().manual_seed(18)
    n, k = 50, 5
    table = torch.randn(n + 1, 4, generator=gen)
    rows = torch.tensor([[7, 23]])  # one position: input item 7, target 23
    hidden = torch.randn(1, 1, 4, generator=gen)
    loss_fn = create_loss("sce", LossContext(n, np.ones(n + 1), negatives=k))
    pos = float(hidden[0, 0] @ table[23])
    torch.manual_seed(19)
    estimates = [math.exp(_loss(loss_fn, table, rows, hidden).item() + pos) for _ in range(6000)]
    full = float(torch.exp(hidden[0, 0] @ table[1:].T).sum())
    assert np.mean(estimates) == pytest.approx(full, rel=0.03)


def test_sce_embeds_its_shared_negatives_in_the_same_tower_call_and_trains_them():
    tower = create_item_tower({"name": "id", "n_items": 30, "dim": 8}, [], True)
    loss_fn = create_loss("sce", LossContext(30, np.ones(31), negatives=6))
    _, sequence, hidden = _inputs(seed=20)
    torch.manual_seed(21)
    vectors, extra, extra_vectors = embed_step(_Model(tower), loss_fn, sequence)
    assert extra.shape == (1, 6) and extra_vectors.shape == (1, 6, 8) and vectors.shape == (4, 7, 8)
    assert torch.equal(extra_vectors[0], tower.table.weight[extra[0]])
    loss_fn(hidden, sequence, vectors, extra, extra_vectors).backward()
    targets = set(sequence[:, 1:][sequence[:, :-1] > 0].tolist())
    trained = {int(i) for i in torch.nonzero(tower.table.weight.grad.abs().sum(1)).flatten()}
    assert trained >= set(extra[0].tolist()) | targets  # the negatives and the targets
    with pytest.raises(UserError, match="--loss ce"):
        create_loss("sce", LossContext(30, np.ones(31), negatives=30))


@pytest.mark.parametrize(("loss", "given", "filled", "error"), [
    ("sce", {}, {"negatives": 1024, "gbce_t": None}, None),
    ("gbce", {}, {"negatives": 256, "gbce_t": 0.75}, None),
    ("sce", {"gbce_t": 0.5}, None, "--gbce-t is an option of --loss gbce, not --loss sce"),
    ("ce", {"negatives": 8}, None, "--negatives is an option of --loss gbce / sce, not --loss ce"),
    ("sce", {"negatives": 0}, None, "--negatives must be >= 1"),
])
def test_loss_options_belong_to_their_losses(loss, given, filled, error):
    opts = TrainOptions(dataset="synth", loss=loss, **given)
    if error:
        with pytest.raises(UserError, match=error):
            check_options(opts)
        return
    checked = check_options(opts)
    assert opts.negatives is None and opts.gbce_t is None  # checking fills a copy, never the given options
    assert {name: getattr(checked, name) for name in filled} == filled
    assert LOSSES.get(loss).context_options(checked) == {k: v for k, v in filled.items() if v is not None}
