"""Masked-autoencoder adaptation of ViT-MAE image encoders (masked-patch reconstruction, paper 001 Table 8)."""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

from extract.adapt_objective import Masker, Objective, ObjectiveDefaults, _seeded, register_objective
from extract.encoder import Encoder
from extract.image import ImagePreprocessor

class AugmentingImagePreprocessor(ImagePreprocessor):
    """MAE's pretraining augmentation: random resized crop (scale 0.2-1) and horizontal flip."""

    SCALE = (0.2, 1.0)

    @property
    def transform(self) -> Callable:
        if self._transform is None:
            from timm.data import create_transform

            self._transform = create_transform(**self.data_config, is_training=True, scale=self.SCALE,
                                               hflip=0.5, color_jitter=None)
        return self._transform

    def describe(self) -> dict:
        return {**super().describe(), "transform": "timm.data.create_transform (train)",
                "scale": list(self.SCALE), "hflip": 0.5}


@register_objective
class MaskedAutoencoder(Objective):
    """MAE: hide 75% of the patches, reconstruct their pixels from the rest (ViTMAEForPreTraining)."""

    name = "mae"
    modality = "image"
    families = ("mae",)
    defaults = ObjectiveDefaults(mask_ratio=0.75, lr=1e-4, batch_size=64, weight_decay=0.05, betas=(0.9, 0.95))

    def extra_settings(self, encoder: Encoder) -> dict:
        return {"norm_pix_loss": bool(encoder.model.config.norm_pix_loss),
                "augmentation": self.train_preprocessor(encoder).describe()}

    def pretraining_model(self, encoder: Encoder, settings: dict) -> nn.Module:
        from transformers import ViTMAEForPreTraining

        config = copy.deepcopy(encoder.model.config)
        config.mask_ratio = settings["mask_ratio"]
        with _seeded(settings["seed"]):
            model = ViTMAEForPreTraining(config)
        model.vit.load_state_dict(encoder.model.state_dict())
        return model

    def train_preprocessor(self, encoder: Encoder) -> Any:
        return AugmentingImagePreprocessor(encoder.preprocessor.data_config, encoder.preprocessor.jpeg_draft)

    def masker(self, encoder: Encoder, settings: dict) -> Masker:
        patches = encoder.model.embeddings.patch_embeddings.num_patches
        hidden = patches - int(patches * (1 - settings["mask_ratio"]))

        def mask(pixels: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
            return {"pixel_values": pixels, "noise": torch.rand(len(pixels), patches)}, hidden * len(pixels)

        return mask
