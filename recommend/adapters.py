"""Adapter tuning (paper 004): Houlsby bottleneck adapters, everything else frozen.

``Adapter(y) = y + up(ReLU(down(y)))`` (004 Eq. 4), inserted after BOTH sub-layers of
every Transformer block, multi-head attention and feed-forward (Houlsby; 004 Table 5
finds that both positions are needed), before the block adds its residual. With
``--adapter-in item|user|both`` they go into the item encoder, the user encoder
(SASRec) or both (004's best: both, Table 4). The encoder's own weights are frozen;
what trains is the adapters, the DT layer, and the user encoder when it carries no
adapters (it is new to the run). The trainable share is recorded in the run config.

Adapters are attached with forward hooks on the module that ends each sub-layer, and
live as that module's child ``adapter``: the library's parameter names stay as they
are, and PyTorch's fused fast path of ``nn.TransformerEncoderLayer`` (which would skip
a hook) turns itself off for a layer with hooks. Weights start near zero, so a fresh
adapter is close to the identity and training starts from the pretrained function.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch import nn

from extract.encoder import Encoder
from extract.registry import EncoderConfig
from featurestore.errors import UserError
from recommend.e2e import (E2E_ONLY, LiveEncoderTower, LiveKind, _live_input, build_live_encoder, refuse_given,
                           tower_options)
from recommend.item_towers import ITEM_TOWERS, ItemTower
from recommend.options import TrainOptions, fill
from recommend.user_encoders import SASRec

ADAPTER_PLACES = ("item", "user", "both")
DEFAULT_ADAPTER_DIM = 64
DEFAULT_ADAPTER_IN = "both"
INIT_STD = 1e-2  # Houlsby's near-identity initialisation


class Adapter(nn.Module):
    """Houlsby bottleneck: ``y + up(ReLU(down(y)))`` over the last dimension."""

    cost_part = "adapters"  # counted apart in the parameter breakdown (recommend.cost)

    def __init__(self, width: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        for linear in (self.down, self.up):
            nn.init.trunc_normal_(linear.weight, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)
            nn.init.zeros_(linear.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.up(torch.relu(self.down(y)))


def _run_adapter(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    return module.adapter(output)


def attach_adapter(module: nn.Module, width: int, bottleneck: int) -> Adapter:
    """Make ``module``'s output pass through a new adapter (its child ``adapter``)."""
    if hasattr(module, "adapter"):
        raise ValueError(f"{type(module).__name__} already carries an adapter")
    adapter = Adapter(width, bottleneck)
    module.add_module("adapter", adapter)
    module.register_forward_hook(_run_adapter)
    return adapter


# --- where the sub-layers end, per architecture: (module, width) for MHA, then FFN -------

Sites = Iterator[tuple[nn.Module, int]]


def _bert_sites(model: nn.Module) -> Sites:
    """BertSelfOutput / BertOutput: dense -> dropout -> [adapter] -> LayerNorm(x + residual)."""
    width = model.config.hidden_size
    for layer in model.encoder.layer:
        yield layer.attention.output.dropout, width
        yield layer.output.dropout, width


def _timm_block_sites(blocks: list[nn.Module]) -> Sites:
    """timm ViT / Swin blocks: attn.proj -> proj_drop -> [adapter]; mlp.fc2 -> drop2 -> [adapter]."""
    for block in blocks:
        yield block.attn.proj_drop, block.attn.proj.out_features
        yield block.mlp.drop2, block.mlp.fc2.out_features


def _vlm_sites(tower: nn.Module) -> Sites:
    """CLIP / SigLIP tower layers: self_attn.out_proj -> [adapter] -> + residual; mlp.fc2 -> [adapter] -> + residual."""
    for layer in tower.encoder.layers:
        yield layer.self_attn.out_proj, layer.self_attn.out_proj.out_features
        yield layer.mlp.fc2, layer.mlp.fc2.out_features


def _mae_sites(model: nn.Module) -> Sites:
    """ViTMAELayer shares one dropout between its sub-layers: adapt after o_proj and fc2."""
    for layer in model.layers:
        yield layer.attention.o_proj, layer.attention.o_proj.out_features
        yield layer.mlp.fc2, layer.mlp.fc2.out_features


# hf: text models (extract.hf): the attention and feed-forward output of each layer, before its residual:
# BERT-like (dense -> dropout -> [adapter] -> LayerNorm(x + residual)), Llama / Qwen / Mistral / Gemma, ModernBERT
TEXT_SITE_PATHS = (("attention.output.dropout", "self_attn.o_proj", "attn.Wo"),
                   ("output.dropout", "mlp.down_proj", "mlp.Wo"))


def _derived_text_sites(model: nn.Module) -> Sites:
    from extract.hf import layer_list

    for layer in layer_list(model):
        for paths in TEXT_SITE_PATHS:
            found = [p for p in paths if _has_submodule(layer, p)]
            if not found:
                raise UserError(f"adapters need the attention and feed-forward outputs of each layer; "
                                f"{type(layer).__name__} has none of {', '.join(paths)}: tune its top layers with "
                                "--mode e2e --top-k K instead")
            yield layer.get_submodule(found[0]), model.config.hidden_size


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


ITEM_SITES: dict[str, Callable[[nn.Module], Sites]] = {
    "bert": _bert_sites,
    "roberta": _bert_sites,
    "vit": lambda model: _timm_block_sites(list(model.blocks)),
    "swin": lambda model: _timm_block_sites([b for stage in model.layers for b in stage.blocks]),
    "mae": _mae_sites,
    "clip": _vlm_sites,  # the tower's layers (Encoder.tower: text_model or vision_model)
    "siglip": _vlm_sites,
    "vilt": _bert_sites,  # ViltLayer: BERT's sub-layer modules, its residuals added by the layer itself
    "hf-text": _derived_text_sites,
    "timm-tokens": lambda model: _timm_block_sites(list(model.blocks)),  # EVA, BEiT, ... (timm: names)
}


def add_item_adapters(encoder: Encoder, bottleneck: int) -> list[Adapter]:
    """Two adapters per block of the item encoder (after MHA and after FFN)."""
    sites = ITEM_SITES.get(encoder.config.family)
    if sites is None:
        raise UserError(_no_sites(encoder.config))
    return [attach_adapter(module, width, bottleneck) for module, width in sites(encoder.tower)]


def add_user_adapters(user_encoder: nn.Module, bottleneck: int) -> list[Adapter]:
    """Two adapters per SASRec block: nn.TransformerEncoderLayer's dropout1 (MHA) and dropout2 (FFN)."""
    if not isinstance(user_encoder, SASRec):
        raise UserError("--adapter-in user/both puts adapters into the user encoder's Transformer blocks; "
                        "that needs --backbone sasrec (or use --adapter-in item)")
    adapters = []
    for layer in user_encoder.blocks.layers:
        width = layer.self_attn.embed_dim
        adapters += [attach_adapter(layer.dropout1, width, bottleneck),
                     attach_adapter(layer.dropout2, width, bottleneck)]
    return adapters


def _no_sites(config: EncoderConfig) -> str:
    return (f"adapters go after the attention and feed-forward sub-layers of Transformer blocks; encoder "
            f"{config.name} ({config.family}) has none. Pick one of the families "
            f"{', '.join(sorted(ITEM_SITES))}, or tune its top stages with --mode e2e --top-k K")


def adapter_places(where: str) -> tuple[bool, bool]:
    """(adapters in the item encoder, adapters in the user encoder)."""
    return where in ("item", "both"), where in ("user", "both")


class AdapterKind(LiveKind):
    """``adapter``: the live encoder, every weight frozen; with item adapters every block runs with gradients."""

    summary = "the encoder runs live, frozen, with Houlsby adapters trained"

    def __call__(self, spec: dict, sources: list, fit: bool) -> ItemTower:
        live = _live_input(spec, sources)
        if live.cache is not None:
            raise UserError("adapters sit in every block, so there is no frozen bottom to cache; drop --cached")
        encoder = build_live_encoder(spec, live)
        in_item, _ = adapter_places(spec["adapter_in"])
        tower = LiveEncoderTower(encoder, live, spec["n_items"], spec["dim"],
                                 first_block=0 if in_item else encoder.depth, tune_top=False,
                                 **tower_options(spec))
        if in_item:
            add_item_adapters(encoder, int(spec["adapter_dim"]))
        return tower

    transfer_settings = LiveKind.transfer_settings + ("adapter_dim", "adapter_in")

    def check_mode(self, opts: TrainOptions, config: EncoderConfig) -> TrainOptions:
        refuse_given(opts, E2E_ONLY, "is for --mode e2e; adapter mode freezes every encoder weight")
        return check_adapter_options(opts, config)

    def mode_spec(self, opts: TrainOptions, dataset: str) -> dict:
        return {"adapter_dim": opts.adapter_dim, "adapter_in": opts.adapter_in}

    def user_encoder_additions(self, tower: dict) -> int | None:
        """The bottleneck width of the adapters in the user encoder, else None."""
        return int(tower["adapter_dim"]) if adapter_places(tower["adapter_in"])[1] else None

    def finish(self, model: nn.Module, spec: dict) -> None:
        """With ``adapter_in`` user/both: freeze the user encoder and add its adapters (training and
        ``load_run`` alike, once the model exists)."""
        tower = spec["item_tower"]
        if adapter_places(tower["adapter_in"])[1]:
            model.user_encoder.requires_grad_(False)
            add_user_adapters(model.user_encoder, int(tower["adapter_dim"]))


ITEM_TOWERS.register("adapter")(AdapterKind())


def check_adapter_options(opts: TrainOptions, config: EncoderConfig) -> TrainOptions:
    """Fill adapter defaults and refuse what cannot carry adapters (checked before anything loads)."""
    opts = fill(opts, adapter_dim=DEFAULT_ADAPTER_DIM, adapter_in=DEFAULT_ADAPTER_IN)
    if opts.adapter_dim < 1:
        raise UserError(f"--adapter-dim must be >= 1, got {opts.adapter_dim}")
    if opts.adapter_in not in ADAPTER_PLACES:
        raise UserError(f"--adapter-in {opts.adapter_in}: choose one of {', '.join(ADAPTER_PLACES)}")
    in_item, in_user = adapter_places(opts.adapter_in)
    if in_item and config.family not in ITEM_SITES:
        raise UserError(_no_sites(config))
    if in_user and opts.backbone != "sasrec":
        raise UserError(f"--adapter-in {opts.adapter_in} puts adapters into the user encoder's Transformer "
                        f"blocks; --backbone {opts.backbone} has none: use --backbone sasrec or --adapter-in item")
    return opts
