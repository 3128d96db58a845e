"""The domain-adaptation objective protocol and its registry (``mlm``, ``mae``).

An objective is one self-supervised pretraining task around an encoder built by
:func:`extract.registry.create_encoder`: the library's pretraining model (encoder +
head), its masking, its loss, its defaults. Each lives in its own module
(:mod:`extract.adapt_mlm`, :mod:`extract.adapt_mae`) and registers itself with
:func:`register_objective`; :mod:`extract.adapt` runs any of them.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from extract.encoder import Encoder
from extract.registry import EncoderConfig, get_encoder_config, list_encoders
from featurestore.errors import UserError
from featurestore.registry import Registry

Masker = Callable[[Any], tuple[dict[str, torch.Tensor], int]]


@dataclass(frozen=True)
class ObjectiveDefaults:
    """Per-objective defaults, from the objective's own paper (BERT / MAE)."""

    mask_ratio: float
    lr: float
    batch_size: int
    weight_decay: float
    betas: tuple[float, float]


class Objective(abc.ABC):
    """A self-supervised objective: the library pretraining model around an encoder, and its masking.

    ``masker(encoder, settings)`` returns a function turning a collated batch of
    encoder inputs into the pretraining model's keyword arguments (masks drawn from
    torch's global RNG, on the CPU) and the number of predicted targets.
    """

    name: str
    modality: str
    families: tuple[str, ...]
    defaults: ObjectiveDefaults

    def fits(self, config: EncoderConfig) -> bool:
        return config.modality == self.modality and config.family in self.families

    def check(self, config: EncoderConfig) -> None:
        """Refuse an encoder this objective cannot train (UserError naming the ones it can)."""
        if not self.fits(config):
            fitting = [n for n in list_encoders(modality=self.modality) if self.fits(get_encoder_config(n))]
            others = [o for o in list_objectives() if get_objective(o).fits(config)]
            hint = (f"; for {config.name} use --objective {' or '.join(others)}" if others
                    else f"; no objective adapts {config.name} yet")
            raise UserError(f"objective {self.name} adapts {self.modality} encoders ({', '.join(fitting)}), "
                            f"not {config.name} ({config.modality}, {config.family}){hint}")

    def extra_settings(self, encoder: Encoder) -> dict:
        """Objective-specific settings recorded in adapt.json."""
        return {}

    @abc.abstractmethod
    def pretraining_model(self, encoder: Encoder, settings: dict) -> nn.Module:
        """The library's pretraining model (encoder + head) holding a copy of ``encoder``'s weights."""

    def train_preprocessor(self, encoder: Encoder) -> Any:
        """Preprocessing of training batches (default: the encoder's own)."""
        return encoder.preprocessor

    @abc.abstractmethod
    def masker(self, encoder: Encoder, settings: dict) -> Masker:
        """Collated encoder inputs -> (the pretraining model's keyword arguments, number of targets)."""

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The pretraining loss of one masked batch (default: the library model's own)."""
        return model(**batch).loss

    def save_extras(self, encoder: Encoder, folder: Path) -> None:
        """Files besides the weights that extraction needs (the tokenizer, for text)."""


# The plugin list: each module registers one objective, imported on the first lookup.
_OBJECTIVES: Registry[Objective] = Registry("objective", unknown="{suggestion}choose one of: {names}", sort=True,
                                            plugins=("extract.adapt_mae", "extract.adapt_mlm"))


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Class decorator: add an objective under ``cls.name`` (a name already taken is refused)."""
    _OBJECTIVES.add(cls.name, cls())
    return cls


def list_objectives() -> list[str]:
    return _OBJECTIVES.names()


def get_objective(name: str) -> Objective:
    """The objective registered as ``name``; a UserError names the nearest and the known ones."""
    return _OBJECTIVES.get(name)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """A block with torch's RNG seeded and the caller's state restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
