"""Side networks over cached per-layer states (IISAN, Fu et al., SIGIR 2024): ``--mode side``.

E2E adapts the encoder by backpropagating through its top blocks over whole token
sequences. IISAN decouples the adaptation instead: the frozen encoders' pooled state
after the stem and after every block is cached once per item (``featurestore extract
--cache-layer all``, :mod:`extract.layers`), and small *side-adapted networks* beside
them learn from those states. The encoders never run during training, so an epoch
costs little more than a TS epoch while the tower still sees every layer.

- **Intra-modal network**, one per modality: bottom-up over the layers, block ``l``
  gates the encoder's layer-``l`` state ``x_l`` with the side state below it,
  ``f_l = g_l x_l + (1 - g_l) s_{l-1}`` (``g_l = sigmoid(a_l / 0.1)``, one learned scalar
  ``a_l`` per layer, starting at 0: an even mix; ``s_{-1} = 0``), and passes the mix
  through a bottleneck adapter, ``s_l = f_l + up(GELU(down(f_l)))``.
- **Inter-modal network**, when text and image are both given: at every aligned layer
  pair it gates the two modalities' states against each other and adds the mix to its
  running state before its own adapter, ``m_l = A_l(m_{l-1} + h_l x^img_l + (1 - h_l) x^txt_l)``.
  Layers are aligned by relative depth when the encoders differ in depth.
- Each network's top state goes through its own head (``Linear``) and DT layer to
  ``d``; with two modalities the three vectors are concatenated and projected to ``d``.

Layers of unequal width (convolutional stages) are first mapped to the network's
width (its last layer's) by a linear map per layer. Items without content get a
learned per-layer state, as the TS towers learn a "missing" vector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from extract.layers import ALL_LAYERS, LayerCache, open_layer_cache, states_variant
from featurestore.errors import UserError
from featurestore.workspace import Workspace
from recommend.features import resolve_groups
from recommend.item_towers import (ITEM_TOWERS, ContentOptions, ItemTower, StoreGroupsKind, check_content, content_spec,
                                   dt_layer)
from recommend.options import TrainOptions, fill, option

DEFAULT_SIDE_DIM = 64  # IISAN's adapter bottleneck
GATE_TEMPERATURE = 0.1
INIT_STD = 1e-2  # near-identity adapters at the start


class SideAdapter(nn.Module):
    """Bottleneck adapter ``y + up(GELU(down(y)))``, starting close to the identity."""

    def __init__(self, width: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        self.act = nn.GELU()
        for linear in (self.down, self.up):
            nn.init.normal_(linear.weight, std=INIT_STD)
            nn.init.zeros_(linear.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.up(self.act(self.down(y)))


def _gate(param: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(param / GATE_TEMPERATURE)


class LayerInputs(nn.Module):
    """Per-layer states of one modality at one width: identity where a layer has it, else a linear map."""

    def __init__(self, widths: Sequence[int], width: int) -> None:
        super().__init__()
        self.widths = tuple(widths)
        self.maps = nn.ModuleList(nn.Identity() if w == width else nn.Linear(w, width) for w in self.widths)

    def forward(self, rows: torch.Tensor) -> list[torch.Tensor]:
        return [m(part) for m, part in zip(self.maps, rows.split(self.widths, dim=-1))]


class IntraModalNetwork(nn.Module):
    """One modality's side network: gated fusion of each layer with the side state below, then an adapter."""

    def __init__(self, layers: int, width: int, bottleneck: int) -> None:
        super().__init__()
        self.gates = nn.Parameter(torch.zeros(layers))
        self.adapters = nn.ModuleList(SideAdapter(width, bottleneck) for _ in range(layers))
        self.head = nn.Linear(width, width)

    def forward(self, states: list[torch.Tensor]) -> torch.Tensor:
        side = torch.zeros_like(states[0])
        for layer, (state, adapter) in enumerate(zip(states, self.adapters)):
            gate = _gate(self.gates[layer])
            side = adapter(torch.lerp(side, state, gate))  # gate * state + (1 - gate) * side, in one op
        return self.head(side)


class InterModalNetwork(nn.Module):
    """Across text and image: each aligned layer pair, gated against each other, accumulates into one side state."""

    def __init__(self, pairs: Sequence[tuple[int, int]], width: int, bottleneck: int) -> None:
        super().__init__()
        self.pairs = tuple(pairs)
        self.gates = nn.Parameter(torch.zeros(len(self.pairs)))
        self.adapters = nn.ModuleList(SideAdapter(width, bottleneck) for _ in self.pairs)
        self.head = nn.Linear(width, width)

    def forward(self, text: list[torch.Tensor], image: list[torch.Tensor]) -> torch.Tensor:
        side = torch.zeros_like(text[0])
        for index, ((t, i), adapter) in enumerate(zip(self.pairs, self.adapters)):
            gate = _gate(self.gates[index])
            side = adapter(side + torch.lerp(text[t], image[i], gate))
        return self.head(side)


def aligned_layers(text_layers: int, image_layers: int) -> list[tuple[int, int]]:
    """Layer pairs by relative depth: as many as the shallower encoder has, both ends included."""
    n = min(text_layers, image_layers)
    if n == 1:
        return [(text_layers - 1, image_layers - 1)]
    return [(round(k * (text_layers - 1) / (n - 1)), round(k * (image_layers - 1) / (n - 1))) for k in range(n)]


class SideTower(ItemTower):
    """Item ids -> cached per-layer states -> side networks -> DT layers -> (fused) item vector."""

    def __init__(self, sources: Sequence[LayerCache], n_items: int, dim: int, bottleneck: int) -> None:
        super().__init__()
        self.n_items, self.dim = n_items, dim
        self.sources = list(sources)
        self.modalities = [s.modality for s in self.sources]
        widths = [s.widths for s in self.sources]
        self.register_buffer("present", torch.from_numpy(np.stack([s.present for s in self.sources])),
                             persistent=False)
        self.missing = nn.ParameterList(nn.Parameter(torch.zeros(sum(w))) for w in widths)
        side_widths = [w[-1] for w in widths]
        self.inputs = nn.ModuleList(LayerInputs(w, width) for w, width in zip(widths, side_widths))
        self.intra = nn.ModuleList(IntraModalNetwork(len(w), width, bottleneck)
                                   for w, width in zip(widths, side_widths))
        self.project = nn.ModuleList(dt_layer(width, dim) for width in side_widths)
        self.inter = None
        if len(self.sources) == 2:
            text, image = self.modalities.index("text"), self.modalities.index("image")
            self.inter_width = side_widths[text]
            self.align = nn.ModuleList(nn.Identity() if w == self.inter_width else nn.Linear(w, self.inter_width)
                                       for w in side_widths)
            self.inter = InterModalNetwork(aligned_layers(len(widths[text]), len(widths[image])),
                                           self.inter_width, bottleneck)
            self.inter_project = dt_layer(self.inter_width, dim)
            self.fuse = nn.Linear(3 * dim, dim)
        _xavier_init(*self.inputs, *self.project, *(net.head for net in self.intra))
        if self.inter is not None:
            _xavier_init(*self.align, self.inter.head, self.inter_project, self.fuse)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        return self.distinct(unique)[inverse].reshape(*ids.shape, self.dim)

    def distinct(self, ids: torch.Tensor) -> torch.Tensor:
        """``(P, dim)`` vectors of distinct item ids."""
        device = self.present.device
        layers = []
        for index, (source, missing, inputs) in enumerate(zip(self.sources, self.missing, self.inputs)):
            rows = torch.from_numpy(source.gather(ids.cpu().numpy())).to(device)
            rows = torch.where(self.present[index, ids].unsqueeze(-1), rows, missing)
            layers.append(inputs(rows))
        vectors = [proj(net(states)) for net, proj, states in zip(self.intra, self.project, layers)]
        if self.inter is None:
            return vectors[0]
        text, image = self.modalities.index("text"), self.modalities.index("image")
        aligned = [[self.align[m](s) for s in layers[m]] for m in range(2)]
        mixed = self.inter_project(self.inter(aligned[text], aligned[image]))
        return self.fuse(torch.cat([*vectors, mixed], dim=-1))


def _xavier_init(*modules: nn.Module) -> None:
    """The papers' initialisation for the new dense maps (adapters keep their near-identity start)."""
    for module in modules:
        for linear in (m for m in module.modules() if isinstance(m, nn.Linear)):
            nn.init.xavier_normal_(linear.weight)
            nn.init.zeros_(linear.bias)


@dataclass(frozen=True)
class SideOptions(ContentOptions):
    side_dim: int | None = option(flag="--side-dim", min=1,
                                  purpose="sets the side networks' adapter bottleneck; it needs --mode side",
                                  help="side: bottleneck width of the side networks' adapters [default: 64, as IISAN].")


class SideKind(StoreGroupsKind):
    """``side``: reads the per-layer caches of one or two store groups (text, image)."""

    options = SideOptions
    summary = ("IISAN's side networks over every layer's pooled state, cached by `featurestore extract "
               "--cache-layer all` (the encoders never run)")
    transfer_settings = StoreGroupsKind.transfer_settings + ("side_dim",)

    def __call__(self, spec: dict, sources: Sequence[Any], fit: bool) -> ItemTower:
        if not sources or not all(isinstance(s, LayerCache) for s in sources):
            raise UserError(f"--mode side reads per-layer states; name their groups with --encoder ENC[,ENC] "
                            f"(extracted with --cache-layer {ALL_LAYERS})")
        recorded = spec.get("widths")
        if recorded is not None and [list(s.widths) for s in sources] != recorded:
            raise UserError(f"the per-layer states of {', '.join(s.group for s in sources)} have layer widths "
                            f"{[list(s.widths) for s in sources]}, the run was trained on {recorded}; "
                            "re-extract them with the run's encoders or retrain the run")
        return SideTower(sources, spec["n_items"], spec["dim"], int(spec["side_dim"]))

    def check(self, opts: TrainOptions) -> TrainOptions:
        opts = check_content(opts)
        groups = len(opts.encoders) + len(opts.features)
        if groups not in (1, 2):
            raise UserError("--mode side trains side networks beside one or two encoders: name their per-layer "
                            "caches with --encoder TEXT_ENC[,IMAGE_ENC] (or --features GROUP[,GROUP])")
        if opts.whiten or opts.fusion not in (None, "concat"):
            raise UserError("--mode side fuses its networks itself (their vectors concatenated, then projected); "
                            "drop --whiten and --fusion")
        return fill(opts, side_dim=DEFAULT_SIDE_DIM)

    def spec(self, opts: TrainOptions, dataset: str) -> dict:
        return content_spec(opts, side_dim=opts.side_dim)

    def study_rows(self, mode: str, study: Any) -> list[tuple[str, dict]]:
        return [(mode, {"encoders": [f"{study.encoder}@{states_variant(ALL_LAYERS)}"]})]

    def study_extraction(self, study: Any) -> tuple[str, str]:
        return ALL_LAYERS, f"every layer's pooled state of {study.encoder}, for side networks"

    def open(self, ws: Workspace, opts: Any, dataset: Any) -> list[LayerCache]:
        groups = resolve_groups(dataset.name, opts.encoders, opts.features)
        sources = [self.open_group(ws, g, dataset.fingerprint, dataset.n_items) for g in groups]
        modalities = sorted(s.modality for s in sources)
        if len(sources) == 2 and modalities != ["image", "text"]:
            raise UserError(f"--mode side with two groups needs one text and one image encoder, got {modalities}; "
                            "the inter-modal network fuses text with image")
        return sources

    def open_group(self, ws: Workspace, group: str, fingerprint: str, n_items: int) -> LayerCache:
        return open_layer_cache(ws.store, group, fingerprint, n_items)

    def describe(self, config: dict, model: Any) -> None:
        config["model"]["item_tower"]["widths"] = [f["widths"] for f in config["features"]]


ITEM_TOWERS.register("side")(SideKind())
