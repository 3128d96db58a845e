"""The shape every encoder takes: ``stem`` -> ``blocks`` -> ``pool``.

Extraction only needs ``forward``, but end-to-end training fine-tunes the top k
blocks and caches what the frozen bottom produces. So every wrapper splits its
library model the same way: ``stem(inputs) -> Hidden``, an ordered sequence of
``blocks`` (Transformer blocks, or ResNet/EfficientNet stages) each
``Hidden -> Hidden``, and ``pool(Hidden) -> (B, width)``, with
``forward = pool(blocks(stem(x)))`` equal to the library's own forward.

The library model stays the one owner of the parameters (``Encoder.model``), so a
state dict has each tensor once under the library's own names; ``stem``, ``blocks``
and ``pool`` are views onto its submodules (their ``.parameters()`` are the ones to
unfreeze for top-k tuning).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from extract.registry import EncoderConfig, WeightsSpec
from featurestore.errors import UserError
from featurestore.store import file_sha256


class BadItem(Exception):
    """An item the encoder cannot read (missing or corrupt image, empty text)."""

    def __init__(self, reason: str, file: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.file = file


@dataclass
class Hidden:
    """What flows between blocks.

    ``states``: (B, L, C) tokens or (B, C, H, W) / (B, H, W, C) feature maps.
    ``token_mask``: (B, L) 1 for real tokens (variable-length states: text, ViLT; pooling needs it).
    ``attn_mask``: the mask in the form the library's blocks expect, built once in
    the stem.
    ``call``: the other arguments the library's own forward hands its blocks (rotary
    position embeddings, relative positions, masks), captured by a stem that runs the
    library's forward up to the first block (:mod:`extract.hf`); None elsewhere.
    """

    states: torch.Tensor
    token_mask: torch.Tensor | None = None
    attn_mask: torch.Tensor | None = None
    call: Any = None

    def with_states(self, states: torch.Tensor) -> "Hidden":
        return dataclasses.replace(self, states=states)


def last_real_token(hidden: Hidden) -> torch.Tensor:
    """``(B, C)``: each item's state at its last real token (real tokens come first)."""
    states = hidden.states
    return states[torch.arange(len(states), device=states.device), hidden.token_mask.sum(1) - 1]


@dataclass(frozen=True)
class TokenStates:
    """States between blocks whose length varies per item (text; ViLT's joint title + patches).

    The stem puts an item's real tokens first, so a cache stores each item's first
    ``count`` tokens, at most ``max_tokens``; ``hidden(states, mask)`` rebuilds from such
    states and their (B, L) validity what the stem hands the blocks (the attention
    mask in the library's form), so cached states continue through the top blocks
    exactly as the naive path's do.
    """

    max_tokens: int
    hidden: Callable[[torch.Tensor, torch.Tensor], Hidden]


class Part(nn.Module):
    """A view onto some modules/parameters of a library model with its own forward.

    The named ``members`` are registered so ``part.parameters()`` lists exactly
    what the function uses; ``fn`` does the computation (usually by calling the
    library model's own methods).
    """

    def __init__(self, fn: Callable[[Any], Any], **members: nn.Module | nn.Parameter | None) -> None:
        super().__init__()
        self._fn = fn
        for key, member in members.items():
            if member is not None:
                setattr(self, key, member)

    def forward(self, x: Any) -> Any:
        return self._fn(x)


def tensor_block(*modules: nn.Module) -> Part:
    """A block over plain tensors: apply ``modules`` in order to ``hidden.states``."""

    def run(hidden: Hidden) -> Hidden:
        x = hidden.states
        for module in modules:
            x = module(x)
        return hidden.with_states(x)

    return Part(run, **{f"m{i}": m for i, m in enumerate(modules)})


class Encoder(nn.Module):
    """A pretrained encoder split into ``stem``, ``blocks`` and ``pool``.

    Attributes:
        config: the registry record.
        model: the library model (owner of all parameters, classifier removed).
        pooling: the pooling in use.
        preprocessor: turns an ``Item`` into model input (runs in DataLoader workers).
        provenance: weights source and sha256, pooling, preprocessing: copied into
            the store's attributes.
        width: the pooled width of the loaded model (a hub snapshot or weights folder
            may hold another size of the family than the registry's default).
        tokens: how variable-length states are cached and restored (None: every
            item's states have one shape, e.g. an image's patches or feature map).
        tower: the library module whose blocks these are: ``model`` itself, or one
            tower of a two-tower model (CLIP's ``vision_model``); adapters go there.
    """

    def __init__(
        self,
        config: EncoderConfig,
        model: nn.Module,
        stem: nn.Module,
        blocks: Sequence[nn.Module],
        pool: nn.Module,
        *,
        pooling: str,
        preprocessor: Any,
        provenance: dict,
        width: int | None = None,
        tokens: TokenStates | None = None,
        tower: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self._width = width or config.width
        self.model = model
        # A tuple is not registered: the views must not duplicate state-dict keys.
        self._views = (stem, nn.ModuleList(blocks), pool, model if tower is None else tower)
        self.pooling = pooling
        self.tokens = tokens
        self.preprocessor = preprocessor
        self.provenance = provenance

    @property
    def stem(self) -> nn.Module:
        return self._views[0]

    @property
    def blocks(self) -> nn.ModuleList:
        return self._views[1]

    @property
    def pool(self) -> nn.Module:
        return self._views[2]

    @property
    def tower(self) -> nn.Module:
        return self._views[3]

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def width(self) -> int:
        return self._width

    @property
    def name(self) -> str:
        return self.config.name

    def run_blocks(self, hidden: Hidden, start: int = 0, stop: int | None = None) -> Hidden:
        """Apply ``blocks[start:stop]`` (top-k tuning runs the frozen bottom once, then the top)."""
        for block in self.blocks[start:stop]:
            hidden = block(hidden)
        return hidden

    def forward(self, inputs: Any) -> torch.Tensor:
        return self.pool(self.run_blocks(self.stem(inputs)))

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def move_inputs(inputs: Any, device: torch.device) -> Any:
    """Move a tensor or a dict of tensors (tokenised text) to ``device``."""
    if isinstance(inputs, dict):
        return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    return inputs.to(device, non_blocking=True)


@contextlib.contextmanager
def build_context(spec: WeightsSpec | None, meta: bool) -> Iterator[None]:
    """Where a model is constructed: the meta device (counting only), or a seeded RNG.

    Seeding inside ``fork_rng`` makes a random-init build reproducible (``verify``
    rebuilds it) without disturbing the caller's random state.
    """
    if meta:
        with torch.device("meta"):
            yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed if spec is not None else 0)
        yield


def state_sha256(model: nn.Module) -> str:
    """sha256 of the loaded state dict (names and bytes): the identity of the weights in use.

    Needed besides the file hash because a hub id or a random init has no single
    file, and because ``resume`` must refuse to mix rows from two different models.
    """
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}:{flat.dtype}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")


def weight_files(location: Path) -> list[Path]:
    """The weight file(s) of a local ``--weights`` path (a file, or a model folder)."""
    if location.is_file():
        return [location]
    files = [p for p in location.iterdir() if p.suffix in WEIGHT_SUFFIXES]
    if not files:
        raise UserError(f"--weights {location}: the folder holds no weight file ({', '.join(WEIGHT_SUFFIXES)})")
    return files


def base_provenance(
    config: EncoderConfig, spec: WeightsSpec, pooling: str, model: nn.Module, files: Sequence[Path],
    width: int | None = None,
) -> dict:
    """The provenance every builder records; families add ``preprocessing``."""
    return {
        "encoder": config.name,
        "family": config.family,
        "architecture": config.architecture,
        "modality": config.modality,
        "width": width or config.width,
        "pooling": pooling,
        "weights": spec.source,
        "weights_kind": spec.kind,
        "weights_location": spec.location,
        "weights_revision": spec.revision,
        "weights_seed": spec.seed if spec.kind == "random-init" else None,
        "weights_files": [str(p) for p in files],
        "weights_sha256": file_sha256(files) if files else None,
        "state_sha256": state_sha256(model),
        "config": config.to_dict(),
    }


def hub_error(location: str, err: Exception) -> UserError:
    """Turn a failed hub download into the one-line fix."""
    return UserError(
        f"could not load weights {location!r} ({type(err).__name__}: {str(err).splitlines()[0][:160]}); "
        "the hub may be unreachable from here: pass a local file/folder to --weights, or --random-init"
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file (.safetensors, or a torch pickle loaded weights-only)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"--weights {path}: not a readable weights file ({type(err).__name__}: {err})") from err
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def load_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str, ignore: Sequence[str] = ()) -> None:
    """Load ``state`` into ``model``; any missing or unexpected key outside ``ignore`` prefixes is an error.

    A strict load with named exceptions (classifier heads, poolers) rather than
    ``strict=False``: a half-loaded encoder would silently produce noise.
    """
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(tuple(ignore))]
    unexpected = [k for k in unexpected if not k.startswith(tuple(ignore))]
    if missing or unexpected:
        raise UserError(
            f"{source} does not fit {type(model).__name__}: {len(missing)} missing keys "
            f"({', '.join(missing[:3])}) and {len(unexpected)} unexpected ({', '.join(unexpected[:3])}); "
            "pass weights of this architecture"
        )
