"""``ce`` with a cached catalogue (``--catalogue-refresh R``) on a tiny live tower: exact at R = 1, refreshed when stated.

The tower is e2e over bert-tiny (random init, its top block tuned) reading the synthetic
titles itself; everything runs without dropout, so the cache (computed in eval mode) holds
exactly the vectors the exact loss computes. The stale rows follow the live items' common
drift (a linear map and a shift fitted over them), so the item tower's gradient is exact ``ce``'s
with the other items' vectors held constant and moved by that fit; a common move of the whole
catalogue changes the cached loss as it changes exact ``ce``.
"""

from __future__ import annotations

import math

import pytest
import torch

from featurestore.cliutil import UserError
from recommend.batches import training_rows
from recommend.e2e import open_live_inputs
from recommend.catalogue_cache import RIDGE
from recommend.losses import LIVE_REFRESH, LossContext, catalogue_vectors, create_loss
from recommend.model import build_recommender
from recommend.run import read_metrics
from recommend.trainer import Objective, TrainOptions, check_options, model_spec, train

pytestmark = pytest.mark.usefixtures("one_thread")

E2E = dict(mode="e2e", encoders=["bert-tiny"], random_init=True, top_k=1, dim=16, dropout=0.0)


@pytest.fixture(scope="module")
def live(synth_ws, synth_dataset):
    ws, name = synth_ws
    opts = check_options(TrainOptions(dataset=name, **E2E))
    torch.manual_seed(0)
    model = build_recommender(model_spec(opts, synth_dataset), open_live_inputs(ws, opts, synth_dataset)).eval()
    rows = torch.from_numpy(training_rows(synth_dataset, model.max_seq_len)[:6])
    return model, rows, synth_dataset


def _ce(dataset, refresh: int):
    return create_loss("ce", LossContext(dataset.n_items, dataset.train_counts(), catalogue_refresh=refresh))


def _grads(model, value: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    value.backward()
    return float(value.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _drift_fit(cached: torch.Tensor, live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``live ~ cached @ A + b``, ridge-pulled towards ``A = I``, by the pseudo-inverse of the centred
    system stacked on ``sqrt(ridge) * I`` rows that ask for ``A = I``."""
    x, y = cached - cached.mean(0), live - live.mean(0)
    d = x.shape[1]
    ridge = RIDGE * float((x * x).sum()) / d
    eye = torch.eye(d) * ridge ** 0.5
    move = torch.linalg.pinv(torch.cat([x, eye]).double()) @ torch.cat([y, eye]).double()
    return move.float(), live.mean(0) - cached.mean(0) @ move.float()


def _exact_with_other_items_following_the_batch(model, loss, rows: torch.Tensor) -> torch.Tensor:
    """Exact ce, but the vectors of items outside ``rows`` held constant (detached) and moved by
    the batch items' fitted drift (zero in value here: the cache is fresh)."""
    table = catalogue_vectors(model)
    in_batch = torch.zeros(len(table), dtype=torch.bool)
    in_batch[rows.unique()] = True
    in_batch[0] = False
    held = table.detach()
    move, shift = _drift_fit(held[in_batch], table[in_batch])
    table = torch.where(in_batch[:, None], table, held @ move + shift)
    vectors = table[rows]
    hidden = model.encode(vectors[:, :-1], rows[:, :-1] > 0)
    return loss(hidden, rows, vectors, None, table)


def _assert_close(ours: dict, theirs: dict, names) -> None:
    """Equal up to float rounding, relative to the largest gradient of ``names`` (some, such as an
    attention key's bias, are zero in exact arithmetic and only rounding in float)."""
    scale = max(float(theirs[name].abs().max()) for name in names)
    for name in names:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-3, atol=1e-4 * scale, msg=name)


def test_r1_is_exact_ce_for_the_user_encoder_and_for_the_batch_items(live):
    model, rows, dataset = live
    exact = _ce(dataset, 0)
    assert exact.cache is None
    value_exact, grads_exact = _grads(model, Objective(model, exact)(rows))
    cached = _ce(dataset, 1)
    value_cached, grads_cached = _grads(model, Objective(model, cached)(rows))
    assert cached.cache.refreshes == 1
    assert value_cached == pytest.approx(value_exact, rel=1e-5)
    user = [n for n in grads_exact if n.startswith("user_encoder.")]
    assert user and set(grads_cached) == set(grads_exact)
    _assert_close(grads_cached, grads_exact, user)
    item = [n for n in grads_exact if n.startswith("item_tower.")]
    assert any(n.startswith("item_tower.encoder.") for n in item)  # the tuned block gets its gradient
    value_held, grads_held = _grads(model, _exact_with_other_items_following_the_batch(model, exact, rows))
    assert value_held == pytest.approx(value_exact, rel=1e-5)
    _assert_close(grads_cached, grads_held, grads_held)


@pytest.mark.parametrize("scale", [1.0, 1.7, "linear"])
def test_a_common_move_of_the_catalogue_changes_the_cached_loss_as_it_changes_exact_ce(live, scale):
    """A stale cache of T while the tower now gives ``T M + c`` (every item moved alike): the
    cached loss, which sees only the batch's items move, equals exact ce over the moved catalogue.
    Held constant instead, the stale rows would let the positives gain ``h . c`` on the normaliser
    (the shortcut that made frequent refreshes collapse, issue 29)."""
    model, rows, dataset = live
    torch.manual_seed(1)
    table = torch.randn(dataset.n_items + 1, 16)
    table[0] = 0
    hidden = torch.randn(*rows[:, :-1].shape, 16)
    users = hidden[rows[:, :-1] > 0]
    shift = 3 * users.mean(0) / users.mean(0).norm()  # towards the users: the move training would find
    move = torch.eye(16) + 0.2 * torch.randn(16, 16) if scale == "linear" else scale * torch.eye(16)
    moved = table @ move + shift
    exact = _ce(dataset, 0)(hidden, rows, moved[rows], None, moved)
    cached = _ce(dataset, 1)(hidden, rows, moved[rows], None, table)
    assert float(cached) == pytest.approx(float(exact), rel=2e-3)  # up to the ridge's pull towards I (1e-3)
    valid = rows[:, :-1] > 0
    h, targets = hidden[valid], rows[:, 1:][valid]
    live = torch.zeros(len(table), dtype=torch.bool)
    live[rows.unique()] = True
    live[0] = False
    stale = ~live
    stale[0] = False
    held = torch.logaddexp(torch.logsumexp(h @ table[stale].T, 1), torch.logsumexp(h @ moved[live].T, 1))
    shortcut = (held - (h * moved[targets]).sum(1)).mean()
    assert float(shortcut) < float(exact) - 0.5  # held constant, the stale rows reward the common move


def test_the_cache_is_refreshed_every_r_steps_and_at_each_epoch_start(live, monkeypatch):
    model, rows, dataset = live
    passes = []
    item_vectors = model.item_vectors
    monkeypatch.setattr(model, "item_vectors", lambda: passes.append(item_vectors()) or passes[-1])
    loss = _ce(dataset, 3)
    objective = Objective(model, loss)
    counts = []
    for _ in range(7):
        objective(rows)
        counts.append(len(passes))
    assert counts == [1, 1, 1, 2, 2, 2, 3]  # steps 1, 4 and 7 refresh
    objective.train()  # the loop starts an epoch: its first step refreshes, then every 3 steps again
    model.eval()
    for _ in range(4):
        objective(rows)
        counts.append(len(passes))
    assert counts[7:] == [4, 4, 4, 5]
    assert not any(table.requires_grad for table in passes) and loss.cache.refreshes == 5  # no-grad passes


def test_live_modes_default_to_the_cached_catalogue_and_0_is_exact():
    assert check_options(TrainOptions(dataset="synth", **E2E)).catalogue_refresh == LIVE_REFRESH
    assert check_options(TrainOptions(dataset="synth", **E2E, catalogue_refresh=0)).catalogue_refresh == 0
    assert check_options(TrainOptions(dataset="synth", mode="id")).catalogue_refresh is None  # exact
    with pytest.raises(UserError, match="--catalogue-refresh is an option of --loss ce, not --loss inbatch"):
        check_options(TrainOptions(dataset="synth", mode="id", loss="inbatch", catalogue_refresh=5))


def test_auto_refreshes_once_a_catalogues_worth_of_items_has_run_live(live, monkeypatch):
    model, rows, dataset = live
    passes = []
    item_vectors = model.item_vectors
    monkeypatch.setattr(model, "item_vectors", lambda: passes.append(item_vectors()) or passes[-1])
    loss = _ce(dataset, "auto")
    objective = Objective(model, loss)
    live_items = len(set(rows.flatten().tolist()) - {0})  # each step runs these items live
    every = math.ceil(dataset.n_items / live_items)  # steps until the live items reach N
    assert every > 1
    counts = []
    for _ in range(2 * every + 1):
        objective(rows)
        counts.append(len(passes))
    assert counts == [1 + step // every for step in range(2 * every + 1)]
    assert loss.cache.steps == 2 * every + 1


@pytest.mark.parametrize("given, checked", [("auto", "auto"), ("7", 7), (0, 0), ("0", 0)])
def test_catalogue_refresh_reads_a_step_count_or_auto(given, checked):
    assert check_options(TrainOptions(dataset="synth", **E2E, catalogue_refresh=given)).catalogue_refresh == checked


@pytest.mark.parametrize("given", ["sometimes", "-1", -3, 2.5])
def test_catalogue_refresh_refuses_anything_else_naming_the_choices(given):
    with pytest.raises(UserError, match="--catalogue-refresh .*number of steps >= 0 .* or auto"):
        check_options(TrainOptions(dataset="synth", **E2E, catalogue_refresh=given))


def test_each_epoch_records_its_refreshes_in_metrics_jsonl(synth_ws, synth_dataset):
    ws, name = synth_ws
    result = train(ws, TrainOptions(dataset=name, run_name="cached-ce-epochs", epochs=2, batch_size=256,
                                    catalogue_refresh=2, **E2E), progress=False, echo=False)
    records = read_metrics(ws.run_dir(result["run"]))
    assert len(records) == 2
    for record in records:  # every 2 steps, the first step of each epoch included
        assert record["catalogue_refreshes"] == math.ceil(record["steps"] / 2)
        assert record["catalogue_refresh_seconds"] > 0
