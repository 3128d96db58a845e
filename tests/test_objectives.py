"""PMMRec's auxiliary objectives (002 Eq. 8-12): each term against an explicit-loop reference,
NID's noise labels against the corruption applied, and a two-modality run end to end."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from eval.evaluate import evaluate
from extract.job import ExtractOptions, run_extraction
from featurestore.cliutil import UserError
from recommend.cli import cli, main
from recommend.losses import LossContext, create_loss
from recommend.model import build_recommender
from recommend.objectives import (NID, ORIGINAL, REPLACED, SHUFFLED, AuxObjectives, Step, attach_objectives,
                                  corrupt, nicl_loss, rcl_loss)
from recommend.run import load_run
from recommend.trainer import Objective, TrainOptions, check_options, train

pytestmark = pytest.mark.usefixtures("one_thread")

N_ITEMS = 40


def random_rows(generator: torch.Generator, users: int, width: int, n_items: int) -> torch.Tensor:
    """Left-padded rows of 2..width distinct items each, like training rows."""
    rows = torch.zeros(users, width, dtype=torch.long)
    for u in range(users):
        n = int(torch.randint(2, width + 1, (1,), generator=generator))
        rows[u, width - n:] = torch.randperm(n_items, generator=generator)[:n] + 1
    return rows


def tiny_model(dim: int = 16, max_seq_len: int = 5):
    torch.manual_seed(0)
    return build_recommender({"n_items": N_ITEMS, "dim": dim, "max_seq_len": max_seq_len,
                              "item_tower": {"name": "id"},
                              "user_encoder": {"name": "sasrec", "blocks": 1, "heads": 2, "dropout": 0.1}})


def make_step(model, rows: torch.Tensor) -> Step:
    vectors = model.embed(rows)
    return Step(model, rows, vectors, model.encode(vectors[:, :-1], rows[:, :-1] > 0))


# --- NID's corruption ------------------------------------------------------------------------

def test_noise_labels_match_the_corruption_applied():
    generator = torch.Generator().manual_seed(1)
    pool = random_rows(generator, 600, 11, 300)
    inputs = pool[:, :-1]
    torch.manual_seed(7)
    noise = corrupt(inputs, pool)
    batch_items = set(pool[pool > 0].tolist())
    for u in range(len(pool)):
        row, own = inputs[u].tolist(), set(pool[u].tolist())
        new, labels = noise.items[u].tolist(), noise.labels[u].tolist()
        shuffled = [l for l, label in enumerate(labels) if label == SHUFFLED]
        for l, (before, after, label) in enumerate(zip(row, new, labels)):
            if before == 0:
                assert after == 0 and label == ORIGINAL
            elif label == ORIGINAL:
                assert after == before
            elif label == SHUFFLED:
                assert after != before and after in row  # moved within the user's own sequence
            else:
                assert label == REPLACED and after not in own and after in batch_items
        # the shuffled positions hold exactly the items they held before, in another order
        assert sorted(new[l] for l in shuffled) == sorted(row[l] for l in shuffled)
        assert len(shuffled) != 1
    assert torch.equal(pool.reshape(-1)[noise.source], noise.items)  # sources name the items' positions
    real = inputs > 0
    shares = [float((noise.labels[real] == label).float().mean()) for label in (SHUFFLED, REPLACED)]
    assert shares[0] == pytest.approx(0.15, abs=0.015) and shares[1] == pytest.approx(0.05, abs=0.01)
    torch.manual_seed(7)
    again = corrupt(inputs, pool)
    assert torch.equal(again.items, noise.items) and torch.equal(again.labels, noise.labels)


def test_corruption_has_limits_a_lone_user_and_a_single_item():
    torch.manual_seed(0)
    pool = torch.tensor([[0, 0, 5, 6], [0, 0, 0, 9]])
    for _ in range(50):  # one item cannot be shuffled; nothing else in the batch, nothing to replace with
        noise = corrupt(pool[1:, :-1], pool[1:])
        assert (noise.labels == ORIGINAL).all() and torch.equal(noise.items, pool[1:, :-1])
    lone = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]])
    labels = torch.cat([corrupt(lone[:, :-1], lone).labels for _ in range(200)])
    assert not (labels == REPLACED).any() and (labels == SHUFFLED).any()


# --- the three terms against explicit loops --------------------------------------------------

def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def nicl_reference(rows: list[list[int]], text: dict[int, np.ndarray], image: dict[int, np.ndarray]) -> float:
    """Eq. 8-9 term by term: sums of exponentials over explicit negative sets."""
    t = {i: _unit(v) for i, v in text.items()}
    v = {i: _unit(x) for i, x in image.items()}
    batch = {i for row in rows for i in row if i}
    losses = []
    for row in rows:
        negatives = batch - set(row)
        for l in range(len(row) - 1):
            item, nxt = row[l], row[l + 1]
            if item == 0:
                continue
            pair = []
            for x, y in ((t, v), (v, t)):
                numerator = (math.exp(x[item] @ y[item]) + math.exp(x[item] @ y[nxt])
                             + math.exp(x[item] @ x[nxt]))
                denominator = math.exp(x[item] @ y[item]) + sum(
                    math.exp(x[item] @ y[n]) + math.exp(x[item] @ x[n]) for n in negatives)
                pair.append(-math.log(numerator / denominator))
            losses.append(sum(pair) / 2)
    return sum(losses) / len(losses)


def test_nicl_matches_the_paper_equations():
    rows = torch.tensor([[0, 3, 1, 4], [2, 5, 6, 7], [0, 0, 8, 3], [0, 1, 9, 2]])
    ids = torch.unique(rows)
    generator = torch.Generator().manual_seed(3)
    text, image = torch.randn(len(ids), 6, generator=generator), torch.randn(len(ids), 6, generator=generator)
    reference = nicl_reference(rows.tolist(), {int(i): text[k].numpy().astype(np.float64) for k, i in enumerate(ids)},
                               {int(i): image[k].numpy().astype(np.float64) for k, i in enumerate(ids)})
    assert float(nicl_loss(rows, ids, text, image)) == pytest.approx(reference, rel=1e-5)


def test_nicl_hand_computed_on_orthogonal_items():
    """Items 1..4 are the basis vectors in both modalities: own pair 1, everything else 0.
    Each anchor: numerator e + 1 + 1; denominator e + 2 negatives x 2 modalities x exp(0)."""
    rows = torch.tensor([[1, 2], [3, 4]])
    ids = torch.tensor([1, 2, 3, 4])
    basis = torch.eye(4)
    assert float(nicl_loss(rows, ids, basis, 3 * basis)) == pytest.approx(math.log((math.e + 4) / (math.e + 2)))


def test_rcl_matches_the_paper_equation():
    generator = torch.Generator().manual_seed(4)
    hidden, corrupted = torch.randn(4, 5, 3, generator=generator), torch.randn(4, 5, 3, generator=generator)
    real = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1], [0, 1, 1, 1, 1]], dtype=torch.bool)
    pooled = [[sum(h[l].double() for l in range(5) if real[u, l]) / int(real[u].sum())
               for u, h in enumerate(states)] for states in (hidden, corrupted)]
    terms = []
    for u in range(4):
        scores = [math.exp(float(pooled[0][u] @ pooled[1][k])) for k in range(4)]
        terms.append(-math.log(scores[u] / sum(scores)))
    assert float(rcl_loss(hidden, corrupted, real)) == pytest.approx(sum(terms) / 4, rel=1e-5)


def test_nid_is_cross_entropy_of_relu_logits_on_the_corrupted_states():
    model = tiny_model().eval()  # no dropout: the corrupted states can be recomputed below
    rows = random_rows(torch.Generator().manual_seed(5), 12, 6, N_ITEMS)
    nid = NID(model)
    torch.manual_seed(11)
    step = make_step(model, rows)
    value = float(nid(step).detach())
    noise, hidden = step.corrupted()
    # reused item vectors == embedding the corrupted ids afresh
    assert torch.allclose(hidden, model.encode(model.embed(noise.items), rows[:, :-1] > 0), atol=1e-5)
    hidden = hidden.detach()
    weight, bias = nid.head.weight.detach().double(), nid.head.bias.detach().double()
    losses = []
    for u in range(len(rows)):
        for l in range(rows.shape[1] - 1):
            if rows[u, l] == 0:
                continue
            logits = [max(0.0, float(hidden[u, l].double() @ weight[k] + bias[k])) for k in range(3)]
            label = int(noise.labels[u, l])
            losses.append(-math.log(math.exp(logits[label]) / sum(math.exp(z) for z in logits)))
    assert value == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_objective_sums_the_terms_and_keeps_the_plain_step():
    model = tiny_model()
    loss = create_loss("bce", LossContext(N_ITEMS, np.ones(N_ITEMS + 1)))
    rows = random_rows(torch.Generator().manual_seed(6), 16, 6, N_ITEMS)
    torch.manual_seed(2)
    plain_objective = Objective(model, loss)
    plain = plain_objective(rows)
    assert plain_objective.terms == {}
    aux = attach_objectives(model, ["nid", "rcl"])
    assert isinstance(aux, AuxObjectives) and model.objectives is aux
    objective = Objective(model, loss, aux)
    torch.manual_seed(2)
    total = objective(rows)
    assert list(objective.terms) == ["rec", "nid", "rcl"]
    assert float(objective.terms["rec"]) == float(plain.detach())  # same seed, same negatives and dropout
    assert float(total.detach()) == pytest.approx(sum(float(v) for v in objective.terms.values()), rel=1e-6)
    total.backward()
    assert aux["nid"].head.weight.grad.abs().sum() > 0
    assert any(k.startswith("objectives.nid.head") for k in model.state_dict())


# --- options -------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    (dict(mode="ts", encoders=["minilm-l6"], objectives=["nicl"]), "nicl .*needs two store groups"),
    (dict(mode="id", objectives=["nicl", "nid"]), "nicl .*needs two store groups"),
    (dict(mode="ts", encoders=["minilm-l6", "efficientnet-lite0"], fusion="merge-attn", objectives=["nicl"]),
     "pooled vector before fusion"),
    (dict(mode="id", objectives=["nid", "nid"]), "names nid more than once"),
    (dict(mode="id", objectives=["cpc"]), "unknown objective 'cpc'; known: nicl, nid, rcl"),
])
def test_unusable_objectives_are_refused_with_the_fix(options, message):
    with pytest.raises(UserError, match=message):
        check_options(TrainOptions(dataset="synth", **options))


def test_bert4rec_is_refused():
    from recommend.objectives import check_objectives

    with pytest.raises(UserError, match="bert4rec trains by cloze"):
        check_objectives(TrainOptions(dataset="synth", backbone="bert4rec", objectives=["rcl"]))


def test_cli_refuses_nicl_on_one_modality(synth_ws, monkeypatch, capsys):
    ws, name = synth_ws
    monkeypatch.setattr(sys, "argv", ["recommend", "train", "--root", str(ws.root), "--dataset", name,
                                      "--mode", "id", "--objectives", "nid,nicl"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("error: --objectives nicl contrasts the text and image vectors")


# --- end to end -------------------------------------------------------------------------------

FAST = dict(dim=32, batch_size=64, lr=1e-3, device="cpu")


def test_resumed_run_with_objectives_matches_an_uninterrupted_one(private_ws, monkeypatch):
    """The corruption draws from the epoch-seeded generator: a resume redraws it exactly."""
    ws = private_ws("objectives_resume")
    options = TrainOptions(dataset="synth", mode="id", objectives=["nid", "rcl"], epochs=3, **FAST)
    train(ws, replace(options, run_name="whole"), progress=False, echo=False)
    import recommend.trainer as trainer_module

    real_validate, calls = trainer_module.validate, []

    def interrupted_in_epoch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "validate", interrupted_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train(ws, replace(options, run_name="cut"), progress=False, echo=False)
    monkeypatch.undo()
    train(ws, replace(options, run_name="cut"), progress=False, echo=False)

    def epochs(run: str) -> list:
        return [(r["epoch"], r["loss"], r["terms"], r["valid"])
                for r in map(json.loads, (ws.run_dir(run) / "metrics.jsonl").open())]

    assert epochs("cut") == epochs("whole") and len(epochs("whole")) == 3
    assert (ws.run_dir("cut") / "model.safetensors").read_bytes() == \
        (ws.run_dir("whole") / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def two_groups(private_ws):
    """Real MiniLM-L6 title vectors and EfficientNet-Lite0 picture vectors of the synthetic items."""
    ws = private_ws("objectives_e2e")
    for encoder in ("minilm-l6", "efficientnet-lite0"):
        result = run_extraction(ws, ExtractOptions(dataset="synth", encoder=encoder, workers=0, progress=False))
        assert result.status == "complete"
    return ws


def test_two_modality_run_with_all_objectives_trains_and_ranks(two_groups, synth_dataset):
    ws = two_groups
    result = CliRunner().invoke(cli, [
        "train", "--root", str(ws.root), "--dataset", "synth", "--mode", "ts-dnn", "--layers", "1",
        "--encoder", "minilm-l6,efficientnet-lite0", "--objectives", "nicl,nid,rcl", "--dim", "32",
        "--lr", "1e-3", "--epochs", "2", "--device", "cpu", "--run-name", "pmm", "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    run_dir = ws.run_dir("pmm")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for record in records:
        terms = record["terms"]
        assert list(terms) == ["rec", "nicl", "nid", "rcl"] and all(math.isfinite(v) for v in terms.values())
        assert record["loss"] == pytest.approx(sum(terms.values()), rel=1e-6)
    log = (run_dir / "train.log").read_text()
    assert f"epoch 2: loss {records[1]['loss']:.4f} (rec {records[1]['terms']['rec']:.4f}, nicl" in log
    config = json.loads((run_dir / "config.json").read_text())
    assert config["options"]["objectives"] == ["nicl", "nid", "rcl"]
    assert [f["group"] for f in config["features"]] == ["synth/text/minilm-l6", "synth/image/efficientnet-lite0"]
    saved = load_file(str(run_dir / "model.safetensors"))
    assert saved["objectives.nid.head.weight"].shape == (3, 32)  # trained and kept with the run
    model, _ = load_run(run_dir)  # ... but not needed to rank
    assert not hasattr(model, "objectives")
    best = json.loads((run_dir / "best.json").read_text())
    again = evaluate(model, synth_dataset, split="valid", ks=(10,))
    assert {k: again[k] for k in best["metrics"]} == best["metrics"]
    ranked = CliRunner().invoke(cli, ["eval", "rank", "--run", "pmm", "--full-pool", "--root", str(ws.root),
                                      "--json"])
    assert ranked.exit_code == 0, ranked.output
    out = json.loads(ranked.stdout)
    assert out["split"] == "test" and 0 <= out["HR@10"] <= 1 and out["users"] > 300
