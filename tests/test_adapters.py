"""Adapter tuning (paper 004): where adapters sit, what trains, what stays frozen, runs that reload."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors import safe_open

from extract.registry import create_encoder
from featurestore.cliutil import UserError
from featurestore.workspace import Workspace
from recommend.adapters import ITEM_SITES, Adapter, attach_adapter
from recommend.batches import training_rows
from recommend.cost import parameter_breakdown
from recommend.e2e import open_live_inputs
from recommend.losses import LossContext, create_loss
from recommend.model import build_recommender
from recommend.run import load_run
from recommend.trainer import Objective, TrainOptions, check_options, model_spec, optimizer_groups, train
from recommend.user_encoders import EncoderConfig, SASRec

pytestmark = pytest.mark.usefixtures("one_thread")

ADAPTER = {"mode": "adapter", "encoders": ["bert-tiny"], "random_init": True, "adapter_dim": 8, "dim": 32}



@pytest.fixture(scope="module")
def ws(private_ws) -> Workspace:
    return private_ws("adapters")


def build(ws, dataset, **options):
    opts = check_options(TrainOptions(dataset="synth", **{**ADAPTER, **options}))
    torch.manual_seed(0)
    return build_recommender(model_spec(opts, dataset), open_live_inputs(ws, opts, dataset)), opts


def adapter_params(width: int, k: int) -> int:
    """Houlsby adapter: down (width x k + k) and up (k x width + width)."""
    return 2 * width * k + k + width


def test_one_step_changes_adapters_and_leaves_base_weights(ws, synth_dataset):
    model, opts = build(ws, synth_dataset, adapter_in="both")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(optimizer_groups(model, 1e-2, opts.encoder_lr), lr=1e-2, weight_decay=0.1)
    loss = create_loss("bce", LossContext(synth_dataset.n_items, synth_dataset.train_counts()))
    rows = torch.from_numpy(training_rows(synth_dataset, model.max_seq_len)[:16])
    model.train()
    Objective(model, loss)(rows).backward()
    optimizer.step()

    after = dict(model.named_parameters())
    adapters = {n for n in after if ".adapter." in n}
    base = {n for n in after if n.startswith(("item_tower.encoder.", "user_encoder.")) and n not in adapters}
    assert len(adapters) == 4 * (2 * 2 + 2 * 2)  # 4 tensors x 2 per block x (2 BERT + 2 SASRec blocks)
    assert all(torch.equal(after[n], before[n]) for n in base)
    assert all(not torch.equal(after[n], before[n]) for n in adapters)
    assert not torch.equal(after["item_tower.project.0.weight"], before["item_tower.project.0.weight"])

    encoder = create_encoder("bert-tiny", random_init=True)
    sasrec = SASRec(EncoderConfig(dim=32, max_seq_len=model.max_seq_len))
    n_adapters = 2 * 2 * adapter_params(128, 8) + 2 * 2 * adapter_params(32, 8)
    dt_and_missing = 128 * 32 + 32 + 128
    trainable = n_adapters + dt_and_missing
    total = encoder.parameter_count() + sum(p.numel() for p in sasrec.parameters()) + n_adapters + dt_and_missing
    breakdown = parameter_breakdown(model)
    assert breakdown["adapters"] == {"trainable": n_adapters, "total": n_adapters, "count": 8}
    assert breakdown["trainable_share"] == pytest.approx(trainable / total)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable


def test_adapter_places(ws, synth_dataset):
    item_only, _ = build(ws, synth_dataset, adapter_in="item")
    assert all(p.requires_grad for p in item_only.user_encoder.parameters())
    assert not any(isinstance(m, Adapter) for m in item_only.user_encoder.modules())
    assert sum(isinstance(m, Adapter) for m in item_only.item_tower.modules()) == 4
    assert item_only.item_tower.first_block == 0  # adapters in every block: all blocks run with gradients

    user_only, _ = build(ws, synth_dataset, adapter_in="user")
    tower = user_only.item_tower
    assert not any(isinstance(m, Adapter) for m in tower.modules())
    assert not any(p.requires_grad for p in tower.encoder.parameters())
    assert tower.first_block == tower.encoder.depth  # the item encoder runs entirely without gradients
    trainable = [n for n, p in user_only.user_encoder.named_parameters() if p.requires_grad]
    assert trainable and all(".adapter." in n for n in trainable)


def _perturbed(adapters: list[Adapter]) -> None:
    with torch.no_grad():
        for adapter in adapters:
            adapter.up.weight.normal_(std=0.5)


def test_sasrec_adapters_are_identity_at_zero_and_run_in_eval_mode():
    """nn.TransformerEncoderLayer has a fused inference path that would skip the adapters."""
    torch.manual_seed(0)
    sasrec = SASRec(EncoderConfig(dim=32, heads=2, max_seq_len=6)).eval()
    items, mask = torch.randn(3, 6, 32), torch.ones(3, 6, dtype=torch.bool)
    with torch.no_grad():
        plain = sasrec(items, mask)
    adapters = [attach_adapter(m, 32, 4) for layer in sasrec.blocks.layers for m in (layer.dropout1, layer.dropout2)]
    for adapter in adapters:
        torch.nn.init.zeros_(adapter.up.weight)
    with torch.no_grad():
        torch.testing.assert_close(sasrec(items, mask), plain)
        _perturbed(adapters)
        assert not torch.allclose(sasrec(items, mask), plain, atol=1e-3)


def _tiny_item_models() -> dict[str, tuple[torch.nn.Module, int, callable]]:
    from transformers import ViTMAEConfig, ViTMAEModel

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56, depths=(1, 1),
                             num_heads=(2, 4), embed_dim=32)
    mae = ViTMAEModel(ViTMAEConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                   image_size=32, patch_size=8, mask_ratio=0.0))
    bert = create_encoder("bert-tiny", random_init=True)
    ids = {"input_ids": torch.tensor([[101, 2417, 4377, 102]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    noise = torch.arange(16.0).expand(1, -1)
    return {
        "vit": (vit, 2, lambda: vit.forward_features(torch.ones(1, 3, 32, 32))),
        "swin": (swin, 2, lambda: swin.forward_features(torch.ones(1, 3, 56, 56))),
        "mae": (mae, 2, lambda: mae(torch.ones(1, 3, 32, 32), noise=noise).last_hidden_state),
        "bert": (bert.model, 2, lambda: bert(ids)),
    }


@pytest.mark.parametrize("family", ["vit", "swin", "mae", "bert"])
def test_item_adapters_sit_after_attention_and_feed_forward(family):
    model, blocks, run = _tiny_item_models()[family]
    model.eval()
    with torch.no_grad():
        plain = run()
    adapters = [attach_adapter(module, width, 4) for module, width in ITEM_SITES[family](model)]
    assert len(adapters) == 2 * blocks
    for adapter in adapters:
        torch.nn.init.zeros_(adapter.up.weight)
    with torch.no_grad():
        torch.testing.assert_close(run(), plain)  # a zero adapter is the identity
        for adapter in adapters:  # each one is on the path: perturbing it alone changes the output
            adapter.up.weight.normal_(std=0.5)
            assert not torch.allclose(run(), plain, atol=1e-4)
            torch.nn.init.zeros_(adapter.up.weight)


def test_refusals(ws, synth_dataset):
    with pytest.raises(UserError, match="efficientnet"):
        build(ws, synth_dataset, encoders=["efficientnet-lite0"], random_init=False)
    with pytest.raises(UserError, match="--backbone sasrec"):
        build(ws, synth_dataset, backbone="gru4rec", adapter_in="both")
    with pytest.raises(UserError, match="--top-k is for --mode e2e"):
        build(ws, synth_dataset, top_k=1)
    with pytest.raises(UserError, match="--cached is for --mode e2e"):
        build(ws, synth_dataset, cached=True)
    with pytest.raises(UserError, match="--adapter-dim is for --mode adapter"):
        build(ws, synth_dataset, mode="e2e", top_k=1)


def test_adapter_run_reloads_and_evaluates_the_same(ws, synth_dataset):
    from eval.evaluate import evaluate

    result = train(ws, TrainOptions(dataset="synth", **ADAPTER, adapter_in="both", epochs=2, batch_size=128,
                                    lr=1e-3, run_name="adapters"), progress=False, echo=False)
    run_dir = ws.run_dir("adapters")
    config = json.loads((run_dir / "config.json").read_text())
    assert config["parameters"]["adapters"]["count"] == 8
    assert 0 < config["parameters"]["trainable_share"] < 0.1
    with safe_open(str(run_dir / "model.safetensors"), "pt") as fh:
        encoder_keys = [k for k in fh.keys() if k.startswith("item_tower.encoder.")]
    assert encoder_keys and all(".adapter." in k for k in encoder_keys)  # base weights are rebuilt
    model, _ = load_run(run_dir)
    assert sum(isinstance(m, Adapter) for m in model.modules()) == 8
    again = evaluate(model, synth_dataset, split="valid", ks=(10,), exclude_history=True)
    assert again["HR@10"] == pytest.approx(result["best"]["HR@10"], abs=1e-9)
