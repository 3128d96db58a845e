"""RecBole's SASRec protocol as options (issue 28): prefix instances, its init, its LayerNorm eps, its
position count, and Adam as AdamW without weight decay."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from featurestore.errors import UserError
from recommend.instances import prefix_rows
from recommend.losses import LossContext, create_loss
from recommend.model import build_recommender
from recommend.options import TrainOptions
from recommend.plugins import check_options
from recommend.trainer import Objective

pytestmark = pytest.mark.usefixtures("one_thread")

N_ITEMS, DIM, LENGTH = 12, 8, 3


class _History:
    """A dataset stand-in: ``history("train")`` is all prefix_rows reads."""

    def __init__(self, sequences):
        self.indptr = np.cumsum([0, *map(len, sequences)])
        self.items = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences])

    def history(self, split):
        assert split == "train"
        return self.indptr, self.items


def _model(**encoder) -> nn.Module:
    torch.manual_seed(0)
    return build_recommender({"n_items": N_ITEMS, "dim": DIM, "max_seq_len": LENGTH, "item_tower": {"name": "id"},
                              "user_encoder": {"name": "sasrec", "dropout": 0.0, **encoder}})


def test_prefix_rows_one_per_pair_cut_to_the_window():
    rows = prefix_rows(_History([[5, 6, 7, 8, 9], [3], [1, 2]]), LENGTH)
    assert rows.tolist() == [[0, 0, 5, 6], [0, 5, 6, 7], [5, 6, 7, 8], [6, 7, 8, 9],  # window of 3 inputs
                             [0, 0, 1, 2]]  # a user with one training item has no pair


@pytest.mark.parametrize("positions", [None, "from-oldest"])
def test_prefix_loss_is_the_mean_over_prefixes_of_the_last_position_ce(positions):
    model = _model(positions=positions).eval()  # no dropout: the loss is a function of the weights
    rows = torch.from_numpy(prefix_rows(_History([[5, 6, 7, 8, 9]]), LENGTH))
    loss = create_loss("ce", LossContext(N_ITEMS, np.ones(N_ITEMS + 1)))
    value = Objective(model, loss, last_only=True)(rows)

    table = model.item_vectors()[1:]  # hand: one instance per prefix, CE of its next item over the catalogue
    by_hand = []
    for row in rows:
        user = model.user_vectors(row[None, :-1])[0]
        logits = table @ user
        by_hand.append(torch.logsumexp(logits, 0) - logits[row[-1] - 1])
    assert value.item() == pytest.approx(torch.stack(by_hand).mean().item(), rel=1e-5)
    every_position = Objective(model, loss)(rows)  # the sequence step scores every position of each row
    assert every_position.item() != pytest.approx(value.item(), rel=1e-3)


def test_from_oldest_positions_make_a_prefix_the_same_as_its_position_in_the_sequence():
    """RecBole's count: a causal state at t does not depend on what follows, so the sequence's position t is
    the prefix ending at t (as for RecBole's SASRec); counted from the newest item it is not."""
    sequence = torch.tensor([[0, 5, 6, 7]])
    for positions, same in (("from-oldest", True), (None, False)):
        model = _model(positions=positions).eval()
        with torch.no_grad():
            states = model.hidden(sequence)
            prefix = model.hidden(torch.tensor([[0, 0, 5, 6]]))
        assert torch.allclose(states[0, -2], prefix[0, -1], atol=1e-5) is same


@pytest.mark.parametrize("name", ["bce", "gbce", "inbatch", "sce"])
def test_prefix_step_takes_every_loss(name):
    model = _model()
    rows = torch.from_numpy(prefix_rows(_History([[5, 6, 7, 8, 9], [1, 2, 3]]), LENGTH))
    ctx = LossContext(N_ITEMS, np.ones(N_ITEMS + 1), negatives=4)
    value = Objective(model, create_loss(name, ctx), last_only=True)(rows)
    value.backward()
    assert torch.isfinite(value)


def test_init_std_is_recboles_normal_init_on_a_built_model():
    std = 0.02
    torch.manual_seed(0)
    model = build_recommender({"n_items": 3000, "dim": 64, "max_seq_len": 50, "item_tower": {"name": "id"},
                               "user_encoder": {"name": "sasrec", "init_std": std, "norm_eps": 1e-12}})
    table = model.item_tower.own_table()
    assert table[0].abs().sum() == 0 and table[1:].std().item() == pytest.approx(std, rel=0.02)
    encoder = model.user_encoder
    weights = [m.weight for m in encoder.modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    weights += [m.in_proj_weight for m in encoder.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(weights) == 1 + 2 * 4  # positions; per block: in_proj, out_proj, two feed-forward layers
    for weight in weights:
        assert weight.std().item() == pytest.approx(std, rel=0.1) and abs(weight.mean().item()) < 0.005
    biases = [m.bias for m in encoder.modules() if isinstance(m, nn.Linear)]
    assert all(b.abs().sum() == 0 for b in biases)
    norms = [m for m in encoder.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 1 + 2 * 2 and {m.eps for m in norms} == {1e-12}

    torch.manual_seed(0)
    default = build_recommender({"n_items": 3000, "dim": 64, "max_seq_len": 50, "item_tower": {"name": "id"},
                                 "user_encoder": {"name": "sasrec"}})
    assert default.item_tower.own_table()[1:].std().item() == pytest.approx(math.sqrt(2 / (3001 + 64)), rel=0.02)
    assert {m.eps for m in default.modules() if isinstance(m, nn.LayerNorm)} == {1e-5}


def test_adamw_without_weight_decay_is_adam():
    """RecBole's optimizer is Adam (weight decay 0); ours is AdamW: with --weight-decay 0 they are the same."""
    results = []
    for optimiser in (lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0),
                      lambda p: torch.optim.Adam(p, lr=1e-2)):
        model = _model()
        rows = torch.from_numpy(prefix_rows(_History([[5, 6, 7, 8, 9], [1, 2, 3, 4]]), LENGTH))
        objective = Objective(model, create_loss("ce", LossContext(N_ITEMS, np.ones(N_ITEMS + 1))))
        opt = optimiser(model.parameters())
        for _ in range(3):
            opt.zero_grad()
            objective(rows).backward()
            opt.step()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(results[0], results[1])


def test_refusals():
    with pytest.raises(UserError, match="--instances prefix .*cloze"):
        check_options(TrainOptions(dataset="x", backbone="bert4rec", instances="prefix"))
    with pytest.raises(UserError, match="--init-std is an option of --backbone sasrec, not --backbone gru4rec"):
        check_options(TrainOptions(dataset="x", backbone="gru4rec", init_std=0.02))
    opts = check_options(TrainOptions(dataset="x", instances="prefix", init_std=0.02, norm_eps=1e-12,
                                      positions="from-oldest"))
    assert (opts.instances, opts.init_std, opts.norm_eps, opts.positions) == ("prefix", 0.02, 1e-12, "from-oldest")
    assert check_options(TrainOptions(dataset="x")).given == {"init_std": 0.02}  # the rest stay unset


def test_init_std_defaults_to_recboles_in_every_mode_and_0_is_the_morec_init():
    assert check_options(TrainOptions(dataset="x")).init_std == 0.02  # chosen on the parity panel
    assert check_options(TrainOptions(dataset="x", mode="ts")).init_std == 0.02
    assert check_options(TrainOptions(dataset="x", backbone="gru4rec")).given == {}  # sasrec's option only
    assert check_options(TrainOptions(dataset="x", init_std=0)).init_std == 0
    spec = {"n_items": 3000, "dim": 64, "max_seq_len": 50, "item_tower": {"name": "id"}}
    built = []
    for encoder in ({"name": "sasrec", "init_std": 0}, {"name": "sasrec"}):
        torch.manual_seed(0)
        built.append(torch.cat([p.detach().flatten() for p in build_recommender({**spec, "user_encoder": encoder})
                               .parameters()]))
    assert torch.equal(built[0], built[1])  # 0 = no normal init: the MoRec code's Xavier / torch's
