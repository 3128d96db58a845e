"""End-to-end towers: which blocks train, cached == naive, refusals, a run that trains and evaluates.

Small encoders only: bert-tiny (random init, 2 blocks) on the synthetic titles and
EfficientNet-Lite0 (its bundled ImageNet weights, 7 stages) on the synthetic JPEGs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from eval.cli import cli as eval_cli
from extract.cache import StateCache
from extract.job import ExtractOptions, run_extraction
from extract.registry import create_encoder
from featurestore.cliutil import UserError
from featurestore.store import FeatureStore
from featurestore.workspace import Workspace
from recommend.batches import training_rows
from recommend.cli import cli as recommend_cli
from recommend.e2e import open_live_inputs
from recommend.losses import LossContext, create_loss
from recommend.model import build_recommender
from recommend.run import load_run
from recommend.trainer import Objective, TrainOptions, check_options, model_spec, optimizer_groups, train

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = {"encoders": ["bert-tiny"], "random_init": True, "top_k": 1}
IMAGE = {"encoders": ["efficientnet-lite0"], "top_k": 2}
USERS = {"bert-tiny": 8, "efficientnet-lite0": 2}  # rows per test batch (224 px images are slow on a CPU)



@pytest.fixture(scope="module")
def ws(private_ws) -> Workspace:
    """A workspace of our own with float32 caches for both encoders."""
    ws, name = private_ws("e2e"), "synth"
    for encoder, top_k, extra in (("bert-tiny", 1, {"random_init": True}), ("efficientnet-lite0", 2, {})):
        run_extraction(ws, ExtractOptions(dataset=name, encoder=encoder, cache_layer=top_k, cache_dtype="float32",
                                          workers=0, progress=False, **extra))
    return ws


def build(ws: Workspace, dataset, **options):
    opts = check_options(TrainOptions(dataset="synth", mode="e2e", dim=32, **options))
    torch.manual_seed(0)
    return build_recommender(model_spec(opts, dataset), open_live_inputs(ws, opts, dataset)), opts


def loss_and_grads(model, dataset, rows: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    """One training loss (fixed negatives) and the gradient of every parameter that gets one."""
    loss = create_loss("bce", LossContext(dataset.n_items, dataset.train_counts()))
    model.zero_grad()
    torch.manual_seed(1)
    value = Objective(model, loss)(rows)
    value.backward()
    return float(value.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def some_rows(dataset, model) -> torch.Tensor:
    n = USERS[model.item_tower.encoder.name]
    return torch.from_numpy(training_rows(dataset, model.max_seq_len)[:n])


@pytest.mark.parametrize("options", [TEXT, IMAGE], ids=["bert-tiny", "efficientnet-lite0"])
def test_exactly_the_top_k_blocks_and_the_recommender_get_gradients(ws, synth_dataset, options):
    model, opts = build(ws, synth_dataset, **options)
    model.train()
    _, grads = loss_and_grads(model, synth_dataset, some_rows(synth_dataset, model))
    encoder = model.item_tower.encoder
    first = encoder.depth - opts.top_k
    top = [*encoder.blocks[first:], encoder.pool]
    bottom = [encoder.stem, *encoder.blocks[:first]]
    top_ids = {id(p) for m in top for p in m.parameters()}
    with_grad = {id(p) for p in encoder.parameters() if p.grad is not None}
    assert with_grad == top_ids and top_ids
    for module in bottom:
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())
    for block in encoder.blocks[first:]:
        assert any(float(p.grad.abs().sum()) > 0 for p in block.parameters())
    recommender = {n for n, _ in model.named_parameters() if not n.startswith("item_tower.encoder.")}
    assert recommender <= set(grads) and "item_tower.project.0.weight" in recommender
    # the frozen bottom runs in eval mode even while the tower trains (no dropout, BN stats kept)
    assert all(not m.training for b in bottom for m in b.modules())
    assert all(m.training for b in top for m in b.modules())


def test_optimizer_puts_encoder_weights_in_their_own_group(ws, synth_dataset):
    model, opts = build(ws, synth_dataset, **TEXT, lr=1e-3)
    assert opts.encoder_lr == pytest.approx(1e-4)  # default: --lr / 10
    groups = {g["name"]: g for g in optimizer_groups(model, opts.lr, opts.encoder_lr)}
    encoder = model.item_tower.encoder
    assert [id(p) for p in groups["encoder"]["params"]] == [id(p) for p in encoder.blocks[1].parameters()]
    assert groups["encoder"]["lr"] == pytest.approx(1e-4) and groups["recommender"]["lr"] == 1e-3
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in groups.values() for p in g["params"]} == trainable


@pytest.mark.parametrize("options", [TEXT, IMAGE], ids=["bert-tiny", "efficientnet-lite0"])
def test_cached_and_naive_paths_give_the_same_loss_and_gradients(ws, synth_dataset, options):
    naive, _ = build(ws, synth_dataset, **options)
    cached, _ = build(ws, synth_dataset, **{**options, "cached": True, "random_init": False})
    assert cached.item_tower.live.cache is not None and naive.item_tower.live.items is not None
    for model in (naive, cached):
        model.eval()  # no dropout: the same function on both paths
    rows = some_rows(synth_dataset, naive)
    loss_n, grads_n = loss_and_grads(naive, synth_dataset, rows)
    loss_c, grads_c = loss_and_grads(cached, synth_dataset, rows)
    assert loss_c == pytest.approx(loss_n, rel=1e-5)
    assert set(grads_n) == set(grads_c)
    for name, grad in grads_n.items():
        scale = float(grad.abs().max()) + 1e-12
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-4, atol=1e-4 * scale, msg=name)


def test_catalogue_is_listed_in_encoder_sized_chunks(ws, synth_dataset):
    whole, opts = build(ws, synth_dataset, **TEXT, with_id="add")
    spec = model_spec(opts, synth_dataset)
    spec["item_tower"]["item_batch"] = 16
    torch.manual_seed(0)
    chunked = build_recommender(spec, open_live_inputs(ws, opts, synth_dataset))
    calls = []
    chunked.item_tower.content.encoder.stem.register_forward_hook(lambda m, i, o: calls.append(len(o.states)))
    expected, got = whole.eval().item_vectors(), chunked.eval().item_vectors()
    assert max(calls) <= 16 and sum(calls) == synth_dataset.n_items
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_cache_holds_the_states_entering_the_top_blocks(ws, synth_dataset):
    group = FeatureStore(ws.store).open("synth/image/efficientnet-lite0")
    assert group.attrs["cache_layer"] == 2 and group.attrs["cache_block"] == 5
    assert group.attrs["cache_layout"] == "channels,height,width" and group.attrs["cache_dtype"] == "float32"
    cache = StateCache(group)
    encoder = create_encoder("efficientnet-lite0")
    ids = np.flatnonzero(cache.present)[:5]
    pixels = torch.stack([encoder.preprocessor.load(synth_dataset.items[i - 1]) for i in ids])
    with torch.no_grad():
        expected = encoder.run_blocks(encoder.stem(pixels), 0, 5).states.numpy()
    got, tokens = cache.gather(ids)
    assert tokens is None and got.shape == expected.shape == (5, *group.attrs["cache_shape"])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    absent = np.flatnonzero(~cache.present[1:]) + 1
    assert len(absent) > 0 and not cache.gather(absent)[0].any()  # no picture: no states

    text = StateCache(FeatureStore(ws.store).open("synth/text/bert-tiny"))
    tokenizer = create_encoder("bert-tiny", random_init=True).preprocessor.tokenizer
    lengths = [len(tokenizer(item.text, truncation=True, max_length=30)["input_ids"])
               for item in synth_dataset.items[:10]]
    assert text.gather(np.arange(1, 11))[1].tolist() == lengths


def test_float16_cache_is_the_default_and_close(ws, synth_dataset):
    run_extraction(ws, ExtractOptions(dataset="synth", encoder="bert-tiny", random_init=True, cache_layer=1,
                                      variant="half", workers=0, progress=False))
    assert FeatureStore(ws.store).open("synth/text/bert-tiny@half").attrs["cache_dtype"] == "float16"
    full, _ = build(ws, synth_dataset, **{**TEXT, "cached": True})
    half, _ = build(ws, synth_dataset, **{**TEXT, "cached": True, "encoders": ["bert-tiny@half"]})
    rows = some_rows(synth_dataset, full)
    for model in (full, half):
        model.eval()
    assert loss_and_grads(half, synth_dataset, rows)[0] == pytest.approx(
        loss_and_grads(full, synth_dataset, rows)[0], rel=1e-2)


def test_refusals(ws, synth_dataset):
    def refused(match: str, **options) -> None:
        with pytest.raises(UserError, match=match):
            train(ws, TrainOptions(dataset="synth", dim=32, epochs=1, **{"mode": "e2e", **options}),
                  progress=False, echo=False)

    refused("bert-tiny has 2 blocks", encoders=["bert-tiny"], random_init=True, top_k=3)
    refused("--random-init", encoders=["bert-base"], top_k=1)  # paper encoder, no local weights
    refused("caches the input of the top 1 blocks", encoders=["bert-tiny"], cached=True, top_k=2)
    refused("--top-k belongs", mode="ts", encoders=["bert-tiny"], top_k=1)

    run_extraction(ws, ExtractOptions(dataset="synth", encoder="bert-tiny", random_init=True, variant="plain",
                                      workers=0, progress=False))
    refused("holds no cached states", encoders=["bert-tiny@plain"], cached=True, top_k=1)

    run_extraction(ws, ExtractOptions(dataset="synth", encoder="bert-tiny", random_init=True, cache_layer=1,
                                      variant="old", workers=0, progress=False))
    FeatureStore(ws.store).open("synth/text/bert-tiny@old").update_attrs(dataset_fingerprint="0123456789abcdef")
    refused("fingerprint", encoders=["bert-tiny@old"], cached=True, top_k=1)

    with pytest.raises(UserError, match="other settings"):  # a rerun must not mix caches of two layers
        run_extraction(ws, ExtractOptions(dataset="synth", encoder="bert-tiny", random_init=True, cache_layer=2,
                                          variant="plain", workers=0, progress=False))
    with pytest.raises(UserError, match="choose 1..2"):
        run_extraction(ws, ExtractOptions(dataset="synth", encoder="bert-tiny", random_init=True, cache_layer=3,
                                          variant="deep", workers=0, progress=False))


def test_gradient_checkpointing_and_amp(ws, synth_dataset):
    plain, _ = build(ws, synth_dataset, **TEXT)
    ckpt, _ = build(ws, synth_dataset, **TEXT, grad_checkpointing=True)
    amp, _ = build(ws, synth_dataset, **TEXT, amp=True)
    rows = some_rows(synth_dataset, plain)
    for model in (plain, ckpt, amp):
        model.train()  # dropout on: the seeded runs draw the same masks, checkpointing replays them
    loss_p, grads_p = loss_and_grads(plain, synth_dataset, rows)
    loss_c, grads_c = loss_and_grads(ckpt, synth_dataset, rows)
    assert loss_c == pytest.approx(loss_p, rel=1e-6)
    for name, grad in grads_p.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-5, atol=1e-7)
    loss_a, grads_a = loss_and_grads(amp, synth_dataset, rows)
    assert np.isfinite(loss_a) and loss_a == pytest.approx(loss_p, rel=0.05)
    assert set(grads_a) == set(grads_p)


def test_e2e_run_trains_and_eval_rank_evaluates_it(ws):
    runner = CliRunner()
    # the exact softmax: its epoch loss is comparable across epochs, while the cached catalogue's
    # (the default for e2e) is scored against negatives that change at each refresh
    common = ["--root", str(ws.root), "--dataset", "synth", "--mode", "e2e", "--encoder", "bert-tiny",
              "--top-k", "1", "--dim", "32", "--batch-size", "128", "--lr", "1e-3", "--catalogue-refresh", "0",
              "--quiet", "--json"]
    out = runner.invoke(recommend_cli, ["train", *common, "--random-init", "--epochs", "3", "--run-name", "naive"])
    assert out.exit_code == 0, out.output
    run_dir = ws.run_dir("naive")
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(epochs) == 3 and epochs[-1]["loss"] < epochs[0]["loss"]
    for epoch in epochs:
        assert epoch["seconds"] > 0 and epoch["sec_per_step"] > 0 and epoch["peak_rss_mb"] > 0
        assert "peak_gpu_mb" in epoch

    config = json.loads((run_dir / "config.json").read_text())
    encoder = create_encoder("bert-tiny", random_init=True)
    top = sum(p.numel() for p in encoder.blocks[1].parameters())
    assert config["parameters"]["item_encoder"] == {"trainable": top, "total": encoder.parameter_count()}
    assert config["cost"]["total_params"] > config["cost"]["trainable_params"] > top
    assert config["parameters"]["trainable_share"] == pytest.approx(
        config["cost"]["trainable_params"] / config["cost"]["total_params"])
    assert config["encoder"] == "bert-tiny" and config["features"] == []
    with safe_open(str(run_dir / "model.safetensors"), "pt") as fh:
        saved = [k for k in fh.keys() if k.startswith("item_tower.encoder.")]
    assert saved and all(".layer.1." in k for k in saved)  # the frozen part is rebuilt, not stored

    best = json.loads((run_dir / "best.json").read_text())
    ranked = runner.invoke(eval_cli, ["rank", "--root", str(ws.root), "--run", "naive", "--split", "valid",
                                      "--k", "10", "--json"])
    assert ranked.exit_code == 0, ranked.output
    assert json.loads(ranked.stdout)["HR@10"] == pytest.approx(best["metrics"]["HR@10"], abs=1e-9)
    assert json.loads(ranked.stdout)["NDCG@10"] == pytest.approx(best["metrics"]["NDCG@10"], abs=1e-6)

    # the cached path trains the same model: same first-epoch loss, and it evaluates the same way
    out = runner.invoke(recommend_cli, ["train", *common, "--cached", "--epochs", "1", "--run-name", "cached"])
    assert out.exit_code == 0, out.output
    cached_epoch = json.loads((ws.run_dir("cached") / "metrics.jsonl").read_text().splitlines()[0])
    assert cached_epoch["loss"] == pytest.approx(epochs[0]["loss"], rel=1e-4)
    assert json.loads((ws.run_dir("cached") / "config.json").read_text())["features"][0]["kind"] == "cache"
    ranked = runner.invoke(eval_cli, ["rank", "--root", str(ws.root), "--run", "cached", "--split", "valid",
                                      "--k", "10", "--json"])
    assert ranked.exit_code == 0, ranked.output

    # a run whose frozen weights no longer match is refused, not silently evaluated
    config["model"]["item_tower"]["state_sha256"] = "0" * 64
    (run_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="sha256"):
        load_run(run_dir)
