"""BERT4Rec: a bidirectional, padding-blind encoder trained by cloze, end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.nn import functional as F

from eval.evaluate import popularity_metrics
from extract.job import ExtractOptions, run_extraction
from featurestore.cliutil import UserError
from recommend.cli import cli
from recommend.cloze import LAST_ONLY_SHARE, cloze_loss, cloze_mask
from recommend.losses import LossContext, create_loss, sample_negatives
from recommend.model import build_recommender
from recommend.run import load_run
from recommend.trainer import TrainOptions, train
from recommend.user_encoders import BERT4Rec, EncoderConfig, create_user_encoder

pytestmark = pytest.mark.usefixtures("one_thread")

DIM, N_ITEMS = 16, 30


def encoder(max_seq_len: int = 8) -> BERT4Rec:
    torch.manual_seed(0)
    return create_user_encoder("bert4rec", EncoderConfig(dim=DIM, blocks=2, heads=2, dropout=0.1,
                                                         max_seq_len=max_seq_len)).eval()


def recommender(mask_prob: float = 0.2):
    torch.manual_seed(0)
    spec = {"n_items": N_ITEMS, "dim": DIM, "max_seq_len": 6, "item_tower": {"name": "id"},
            "user_encoder": {"name": "bert4rec", "blocks": 2, "heads": 2, "dropout": 0.1,
                             "mask_prob": mask_prob}}
    return build_recommender(spec).eval()


def test_encoder_is_bidirectional_and_padding_blind():
    enc = encoder()
    items = torch.randn(2, 8, DIM)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, :3] = False
    out = enc(items, mask)  # out[:, j] is input j + 1's state; out[:, -1] the appended [MASK]'s
    assert out.shape == (2, 8, DIM)
    later = items.clone()
    later[:, 6] += torch.randn(DIM)
    changed = enc(later, mask)
    assert not torch.allclose(changed[:, 3], out[:, 3])  # item 6 reaches item 4's state
    assert not torch.allclose(changed[:, -1], out[:, -1])
    noisy_padding = items.clone()
    noisy_padding[0, :3] = 100 * torch.randn(3, DIM)
    torch.testing.assert_close(enc(noisy_padding, mask)[0, 2:], out[0, 2:], rtol=0, atol=1e-6)
    short = enc(items[:1, 3:], mask[:1, 3:])  # the same history without its left padding
    torch.testing.assert_close(short[0, -1], out[0, -1], atol=1e-5, rtol=1e-5)


def test_inference_is_the_mask_last_training_form():
    """The appended [MASK] sits where cloze puts a masked last item: same position, same state."""
    enc = encoder()
    row = torch.randn(1, 9, DIM)  # 8 history items + the item that follows them
    masked = torch.zeros(1, 9, dtype=torch.bool)
    masked[0, -1] = True
    trained_form = enc.fill(row, torch.ones(1, 9, dtype=torch.bool), masked)[0, -1]
    torch.testing.assert_close(enc(row[:, :-1], torch.ones(1, 8, dtype=torch.bool))[0, -1], trained_form)
    assert enc.positions.num_embeddings == 9


def test_cloze_mask_masks_real_items_in_the_papers_numbers():
    lengths = torch.arange(4000) % 10 + 2  # 2..11 real items in rows of 11
    rows = torch.randint(1, N_ITEMS + 1, (4000, 11)) * (torch.arange(11) >= 11 - lengths[:, None])
    torch.manual_seed(5)
    masked = cloze_mask(rows, 0.3)
    assert not (masked & (rows == 0)).any()
    count = masked.sum(1)
    share = torch.clamp(torch.round(lengths * 0.3), min=1)
    last_only = (count == 1) & masked[:, -1]
    assert ((count == share) | last_only).all()
    several = share >= 2
    assert float((count[several] == 1).float().mean()) == pytest.approx(LAST_ONLY_SHARE, abs=0.025)
    full = (lengths == 11) & (count == 3)  # randomly masked full rows: 3 of 11, uniform positions
    assert float(masked[full, :-1].float().mean(0).std()) < 0.05
    torch.manual_seed(5)
    assert torch.equal(cloze_mask(rows, 0.3), masked)  # the global RNG, seeded per epoch
    assert not torch.equal(cloze_mask(rows, 0.3), masked)


def test_the_masked_positions_are_exactly_the_replaced_ones(monkeypatch):
    model = recommender(mask_prob=0.4)
    enc = model.user_encoder
    rows = torch.randint(1, N_ITEMS + 1, (16, 7))
    rows[:6, :3] = 0
    seen = {}
    transform = enc.transform

    def spy(items, attention):
        seen["items"] = items.detach().clone()
        return transform(items, attention)

    monkeypatch.setattr(enc, "transform", spy)
    loss = create_loss("bce", LossContext(N_ITEMS, np.ones(N_ITEMS + 1)))
    torch.manual_seed(3)
    assert torch.isfinite(cloze_loss(model, loss, rows))
    torch.manual_seed(3)
    expected = cloze_mask(rows, 0.4)
    replaced = (seen["items"] == enc.mask_vector.detach()).all(-1)
    assert torch.equal(replaced, expected) and replaced.any(1).all()
    assert not (replaced & (rows == 0)).any()
    kept = model.embed(rows).detach()
    torch.testing.assert_close(seen["items"][~replaced], kept[~replaced], rtol=0, atol=0)


ROWS = torch.tensor([[0, 0, 3, 7, 9, 2, 5],
                     [4, 8, 1, 6, 11, 12, 13],
                     [0, 0, 0, 0, 20, 21, 22],
                     [0, 14, 7, 3, 25, 26, 9]])
MASKED = torch.zeros_like(ROWS, dtype=torch.bool)
for _b, _t in [(0, 3), (0, 5), (1, 0), (1, 4), (1, 6), (2, 6), (3, 2), (3, 3)]:
    MASKED[_b, _t] = True


def masked_states(model):
    """(b, t, state, target) of every masked position, from the encoder and the item table."""
    hidden = model.user_encoder.fill(model.embed(ROWS), ROWS > 0, MASKED)
    return [(b, t, hidden[b, t], int(ROWS[b, t])) for b, t in MASKED.nonzero().tolist()]


def test_cloze_bce_equals_a_hand_computed_reference():
    model = recommender()
    loss = create_loss("bce", LossContext(N_ITEMS, np.ones(N_ITEMS + 1)))
    torch.manual_seed(11)
    got = cloze_loss(model, loss, ROWS, MASKED)
    torch.manual_seed(11)
    negatives = sample_negatives(F.pad(ROWS, (0, 1)), N_ITEMS)  # the draw cloze_loss makes
    table = model.item_vectors()
    pos, neg = [], []
    for b, t, state, target in masked_states(model):
        assert int(negatives[b, t]) not in ROWS[b].tolist()
        pos.append(-torch.log(torch.sigmoid(state @ table[target])))
        neg.append(-torch.log(1 - torch.sigmoid(state @ table[negatives[b, t]])))
    torch.testing.assert_close(got, torch.stack(pos).mean() + torch.stack(neg).mean())


def test_cloze_inbatch_equals_a_hand_computed_reference():
    model = recommender()
    counts = np.arange(N_ITEMS + 1) % 7  # some items never seen in training: counted as 1
    loss = create_loss("inbatch", LossContext(N_ITEMS, counts))
    got = cloze_loss(model, loss, ROWS, MASKED)
    table = model.item_vectors()
    candidates = sorted(set(ROWS[MASKED].tolist()))
    terms = []
    for b, t, state, target in masked_states(model):
        same_user = set(ROWS[b][MASKED[b]].tolist()) - {target}  # the row's other masked items
        logits = torch.stack([state @ table[c] - np.log(max(counts[c], 1)) if c not in same_user
                              else torch.tensor(float("-inf")) for c in candidates])
        terms.append(-torch.log_softmax(logits, 0)[candidates.index(target)])
    torch.testing.assert_close(got, torch.stack(terms).mean())


# --- options and end to end -----------------------------------------------------------

FAST = dict(backbone="bert4rec", dim=32, batch_size=32, lr=3e-3, patience=10)


def run(ws, **options):
    return train(ws, TrainOptions(dataset="synth", **{**FAST, **options}),
                 progress=False, echo=False)


@pytest.mark.parametrize("options, message", [
    (dict(backbone="sasrec", mask_prob=0.3), "--mask-prob is the cloze masking share"),
    (dict(mask_prob=1.0), r"--mask-prob must be in \(0, 1\)"),
    (dict(mask_prob=0.0), r"--mask-prob must be in \(0, 1\)"),
    (dict(dim=30, heads=4), "divisible by --heads"),
])
def test_bad_cloze_options_are_user_errors(synth_ws, options, message):
    with pytest.raises(UserError, match=message):
        run(synth_ws[0], **options)


def test_same_seed_same_masks_and_the_default_share_is_recorded(private_ws):
    ws = private_ws("bert4rec_seed")
    runs = [run(ws, mode="id", epochs=2, seed=4, run_name=f"seed-{i}") for i in range(2)]
    lines = [(ws.run_dir(r["run"]) / "metrics.jsonl").read_text().splitlines() for r in runs]
    strip = lambda ls: [{k: json.loads(x)[k] for k in ("loss", "valid")} for x in ls]  # noqa: E731
    assert strip(lines[0]) == strip(lines[1])
    config = json.loads((ws.run_dir("seed-0") / "config.json").read_text())
    assert config["options"]["mask_prob"] == 0.2 and config["model"]["user_encoder"]["mask_prob"] == 0.2


@pytest.fixture(scope="module")
def text_ws(private_ws):
    """A private workspace with real MiniLM-L6 title vectors."""
    ws = private_ws("bert4rec_text")
    result = run_extraction(ws, ExtractOptions(dataset="synth", encoder="minilm-l6", workers=0,
                                               progress=False))
    assert result.status == "complete"
    return ws


def invoke(*args: str) -> dict:
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_cli_trains_beats_popularity_and_eval_rank_reproduces_it(text_ws, synth_dataset):
    root = str(text_ws.root)
    result = invoke("train", "--root", root, "--dataset", "synth", "--mode", "ts-dnn", "--layers", "2",
                    "--encoder", "minilm-l6", "--backbone", "bert4rec", "--mask-prob", "0.25",
                    "--loss", "inbatch", "--dim", "32", "--lr", "3e-3", "--epochs", "15",
                    "--run-name", "b4r", "--quiet")
    popularity = popularity_metrics(synth_dataset, "valid", ks=(10,))["HR@10"]
    # the generated world's content signal is a minority of the next-item mixture (see data.synth)
    assert result["best"]["HR@10"] > popularity, (result["best"], popularity)
    model, config = load_run(text_ws.run_dir("b4r"))
    assert isinstance(model.user_encoder, BERT4Rec) and model.user_encoder.mask_prob == 0.25
    assert config["model"]["user_encoder"]["mask_prob"] == 0.25
    ranked = invoke("eval", "rank", "--root", root, "--run", "b4r", "--split", "valid", "--k", "10")
    best = json.loads((text_ws.run_dir("b4r") / "best.json").read_text())["metrics"]
    assert {k: ranked[k] for k in best} == best
