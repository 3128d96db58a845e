"""Item towers and backbones: the paper's structures, missing content, whitening, causality."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from featurestore.cliutil import UserError
from recommend.features import FeatureSource, fit_whitening
from recommend.item_towers import TS_DNN_STACKS, create_item_tower, list_fusions, ts_dnn_stack
from recommend.losses import LossContext, create_loss
from recommend.model import build_recommender
from recommend.trainer import Objective
from recommend.user_encoders import USER_ENCODERS, EncoderConfig, create_user_encoder, list_user_encoders

pytestmark = pytest.mark.usefixtures("one_thread")

N_ITEMS, FEAT, DIM = 40, 24, 16



def make_source(group: str = "d/image/e", dim: int = FEAT, seed: int = 0,
                missing: tuple[int, ...] = (3, 7)) -> FeatureSource:
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(N_ITEMS + 1, dim)).astype(np.float32)
    present = np.ones(N_ITEMS + 1, dtype=bool)
    present[[0, *missing]] = False
    rows[[0, *missing]] = 0.0
    return FeatureSource(group, rows, present, dim, "fp", {})


def tower_spec(name: str, **extra) -> dict:
    return {"name": name, "n_items": N_ITEMS, "dim": DIM, **extra}


@pytest.mark.parametrize("layers", [0, 1, 8])
def test_ts_dnn_stack_has_the_papers_structure(layers):
    stack = ts_dnn_stack(FEAT, DIM, layers, dropout=0.1)
    kinds = [type(m) for m in stack]
    assert kinds == [nn.Linear, nn.GELU] + [nn.Dropout, nn.Linear, nn.GELU] * layers
    assert stack[0].in_features == FEAT and stack[0].out_features == DIM
    assert all(m.p == 0.1 for m in stack if isinstance(m, nn.Dropout))
    assert sum(p.numel() for p in stack.parameters()) == FEAT * DIM + DIM + layers * (DIM * DIM + DIM)


def test_residual_ts_dnn_starts_as_ts_while_the_papers_stack_shrinks_its_vectors():
    """Why ``--dnn residual`` is the default: at initialisation TS-DNN-8 equals its DT layer
    (the blocks are identities, yet every block gets a gradient), while the paper's
    Xavier-initialised GELU stack shrinks item vectors by orders of magnitude."""
    x = torch.from_numpy(make_source().rows[1:])
    torch.manual_seed(0)
    residual = create_item_tower(tower_spec("ts-dnn", layers=8, dnn="residual"), [make_source()]).eval()
    stack = residual.projections[0]
    assert sum(p.numel() for p in stack.parameters()) == FEAT * DIM + DIM + 8 * (DIM * DIM + 3 * DIM)
    assert torch.allclose(stack(x), stack[0](x))
    stack(x).pow(2).sum().backward()
    assert all(block.linear.weight.grad.abs().sum() > 0 for block in stack[1:])

    torch.manual_seed(0)
    paper = create_item_tower(tower_spec("ts-dnn", layers=8, dnn="paper"), [make_source()]).eval()
    first = paper.projections[0][:2](x).norm(dim=1).mean()
    assert paper.projections[0](x).norm(dim=1).mean() < first / 50
    assert TS_DNN_STACKS.names() == ["paper", "residual"]


def test_ts_tower_is_the_dt_layer_and_counts_parameters():
    tower = create_item_tower(tower_spec("ts"), [make_source()])
    linears = [m for m in tower.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and not any(isinstance(m, nn.GELU) for m in tower.modules())
    # DT layer + the learned missing-content vector
    assert sum(p.numel() for p in tower.parameters()) == FEAT * DIM + DIM + FEAT

    dnn = create_item_tower(tower_spec("ts-dnn", layers=4), [make_source()])
    assert sum(p.numel() for p in dnn.parameters()) == FEAT * DIM + DIM + 4 * (DIM * DIM + DIM) + FEAT


def test_feature_tower_reads_rows_and_dedups_ids():
    source = make_source()
    tower = create_item_tower(tower_spec("ts"), [source]).eval()
    linear = next(m for m in tower.modules() if isinstance(m, nn.Linear))
    ids = torch.tensor([[1, 2, 1], [5, 2, 9]])
    expected = linear(torch.from_numpy(source.rows[ids.numpy()]))
    torch.testing.assert_close(tower(ids), expected)


@pytest.mark.parametrize("ids", [[5, 6, 7, 8], [0, 1, 2], [9, 3, 3, 12], [4], [7, 8, 10]])
def test_gather_reads_any_ids_and_runs_of_ids_alike(ids):
    """A run of consecutive ids takes the slice path, anything else the sorted read:
    both give ``rows[ids]`` as a fresh, writable float32 array (also from float16 rows)."""
    source = make_source()
    half = FeatureSource("d/image/h", source.rows.astype(np.float16), source.present, FEAT, "fp", {})
    for src in (source, half):
        got = src.gather(np.array(ids))
        assert got.dtype == np.float32 and got.flags.writeable
        np.testing.assert_array_equal(got, src.rows[ids].astype(np.float32))
        got[:] = 1.0
        assert not (src.rows[ids] == 1.0).all()  # a copy, not a view of the store's rows


def test_missing_content_uses_a_learned_vector_not_the_zero_row():
    source = make_source(missing=(3, 7))
    tower = create_item_tower(tower_spec("ts-dnn", layers=1, dropout=0.0), [source])
    with torch.no_grad():
        tower.inputs[0].missing.copy_(torch.arange(FEAT, dtype=torch.float32))
    projection = tower.projections[0]
    out = tower(torch.tensor([3, 7, 4]))
    torch.testing.assert_close(out[0], projection(torch.arange(FEAT, dtype=torch.float32)))
    torch.testing.assert_close(out[0], out[1])
    source.rows[3] = 100.0  # whatever the store holds for a missing item is ignored
    torch.testing.assert_close(tower(torch.tensor([3]))[0], out[0])
    out.sum().backward()
    assert tower.inputs[0].missing.grad is not None and tower.inputs[0].missing.grad.abs().sum() > 0


def test_whitening_matches_sklearn_and_is_identity_covariance():
    from sklearn.decomposition import PCA

    source = make_source(dim=8)
    source.rows[1:] = source.rows[1:] @ np.diag(np.arange(1, 9)).astype(np.float32)  # anisotropic
    mean, proj = fit_whitening(source)
    rows = source.catalogue()
    white = (rows - mean) @ proj
    np.testing.assert_allclose(np.cov(white.T, ddof=1), np.eye(8), atol=1e-4)
    reference = PCA(whiten=True).fit(rows.astype(np.float64)).transform(rows)
    np.testing.assert_allclose(np.abs(white), np.abs(reference), atol=1e-4)  # signs are free

    tower = create_item_tower(tower_spec("ts", whiten=True), [source])
    state = tower.state_dict()
    assert "inputs.0.white_proj" in state and "inputs.0.white_mean" in state  # saved in checkpoints


def test_whitening_with_fewer_items_than_dimensions_stays_finite():
    source = make_source(dim=64)  # 38 present items, 64 dims: rank-deficient
    mean, proj = fit_whitening(source)
    assert proj.shape == (64, 64) and np.isfinite(proj).all()
    assert (np.abs(proj).sum(0) > 0).sum() <= 38


@pytest.mark.parametrize("fusion", list_fusions())
def test_fusion_modes_train_a_step(fusion):
    sources = [make_source("d/text/t", seed=1), make_source("d/image/i", dim=12, seed=2)]
    step_changes_every_parameter(tower_spec("ts-dnn", layers=1, fusion=fusion), sources)


@pytest.mark.parametrize("how", ["add", "concat"])
def test_with_id_trains_a_step(how):
    step_changes_every_parameter(tower_spec("ts", with_id=how), [make_source(missing=())])


def step_changes_every_parameter(tower: dict, sources, backbone: str = "sasrec") -> None:
    spec = {"n_items": N_ITEMS, "dim": DIM, "max_seq_len": 6, "item_tower": tower,
            "user_encoder": {"name": backbone, "blocks": 2, "heads": 2, "dropout": 0.1}}
    torch.manual_seed(0)
    model = build_recommender(spec, sources)
    objective = Objective(model, create_loss("bce", LossContext(N_ITEMS, np.ones(N_ITEMS + 1))))
    rows = torch.randint(1, N_ITEMS + 1, (8, 7))
    rows[:3, :2] = 0
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = objective(rows)
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    unchanged = [k for k, v in model.named_parameters()
                 if torch.equal(v, before[k]) and not k.endswith("missing")]
    assert not unchanged


@pytest.mark.parametrize("backbone", list_user_encoders())
def test_backbones_train_a_step(backbone):
    step_changes_every_parameter(tower_spec("id"), [], backbone=backbone)


CAUSAL = [b for b in list_user_encoders() if not getattr(USER_ENCODERS.get(b), "cloze", False)]


@pytest.mark.parametrize("backbone", CAUSAL)  # bert4rec, bidirectional: tests/test_bert4rec.py
def test_backbones_are_causal_and_ignore_padding(backbone):
    torch.manual_seed(0)
    enc = create_user_encoder(backbone, EncoderConfig(dim=DIM, blocks=2, heads=2, dropout=0.1,
                                                      max_seq_len=8)).eval()
    items = torch.randn(2, 8, DIM)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, :3] = False
    items[0, :3] = 0
    out = enc(items, mask)
    changed = items.clone()
    changed[:, 5] += torch.randn(DIM)
    out2 = enc(changed, mask)
    torch.testing.assert_close(out[:, :5], out2[:, :5])  # the future does not leak back
    assert not torch.allclose(out[:, 5:], out2[:, 5:])
    # the user vector does not depend on how much left padding there is
    short = enc(items[:1, 3:], mask[:1, 3:])
    torch.testing.assert_close(short[0, -1], out[0, -1], atol=1e-5, rtol=1e-5)


def test_bad_tower_requests_are_user_errors():
    with pytest.raises(UserError, match="--encoder ENC or --features"):
        create_item_tower(tower_spec("ts"), [])
    with pytest.raises(UserError, match="reads no features"):
        create_item_tower(tower_spec("id"), [make_source()])
    with pytest.raises(UserError, match="needs --mode ts or ts-dnn"):
        create_item_tower(tower_spec("id", with_id="add"))
    with pytest.raises(UserError, match="unknown item tower 'e2f'.*ts-dnn"):
        create_item_tower(tower_spec("e2f"))
    with pytest.raises(UserError, match="unknown fusion"):
        create_item_tower(tower_spec("ts", fusion="mean"), [make_source(), make_source()])
