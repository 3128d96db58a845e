"""``--method rq-vae``: TIGER's residual-quantised auto-encoder, trained in torch on the stored vectors.

TIGER (Rajput et al., NeurIPS 2023, §3.1): an MLP encodes the content vector into a small
latent; L codebooks quantise it residually (level l picks the code nearest to what levels
1..l-1 left over); an MLP decodes the sum of the picked codes. The loss is the reconstruction
error plus, per level, the VQ-VAE codebook and commitment terms (beta = 0.25); the decoder sees
the quantised latent through the straight-through estimator. Codebooks start from latent
residuals of the catalogue (TIGER starts them with k-means), and a code no item used during an
epoch is restarted at a random item's residual (dead-code restarts), so the codebook does not
collapse onto a few codes.

Inputs are standardised (one mean vector, one scale) so the learning rate means the same for
every encoder's width and norm. Deterministic for a seed on one CPU thread count.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import nn

from extract.quantise import QUANTISERS, Quantised, check_sizes, relative_error

DEFAULT_EPOCHS = 50
LATENT, HIDDEN = 32, 256  # TIGER: 768 -> 512 -> 256 -> 128 -> 32; one hidden layer suffices at d <= 1024
BETA = 0.25  # commitment weight (VQ-VAE, TIGER)
BATCH, LR = 1024, 1e-3
MIN_STEPS = 300  # a small catalogue is one batch an epoch: it gets more epochs, not fewer updates


class ResidualVAE(nn.Module):
    """Encoder MLP -> L residual codebooks -> decoder MLP."""

    def __init__(self, dim: int, levels: int, codebook: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(dim, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, LATENT))
        self.decoder = nn.Sequential(nn.Linear(LATENT, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, dim))
        self.codebooks = nn.Parameter(torch.zeros(levels, codebook, LATENT))

    def quantise(self, z: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """``z`` (n, latent) -> codes (n, L), each level's residual before it, each level's picked code."""
        residual, codes, residuals, picked = z, [], [], []
        for book in self.codebooks:
            code = torch.cdist(residual, book).argmin(dim=1)
            residuals.append(residual)
            picked.append(book[code])
            codes.append(code)
            residual = residual - book[code].detach()
        return torch.stack(codes, dim=1), residuals, picked

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)
        _, residuals, picked = self.quantise(z)
        vq = sum(((r.detach() - e) ** 2).mean() + BETA * ((r - e.detach()) ** 2).mean()
                 for r, e in zip(residuals, picked))
        quantised = sum(picked)
        straight_through = z + (quantised - z).detach()
        return ((self.decoder(straight_through) - x) ** 2).mean() + vq

    @torch.no_grad()
    def restart(self, x: torch.Tensor, generator: torch.Generator, dead_only: bool) -> int:
        """Put each level's unused codes (every code when not ``dead_only``) on random items' residuals
        at that level; returns how many were restarted."""
        residual, restarted = self.encoder(x), 0
        for book in self.codebooks:
            used = torch.zeros(len(book), dtype=torch.bool)
            used[torch.cdist(residual, book).argmin(dim=1)] = True
            dead = torch.nonzero(~used).flatten() if dead_only else torch.arange(len(book))
            if len(dead):
                book[dead] = residual[torch.randint(len(residual), (len(dead),), generator=generator)]
                restarted += len(dead)
            residual = residual - book[torch.cdist(residual, book).argmin(dim=1)]
        return restarted


@QUANTISERS.register("rq-vae")
def rq_vae(x: np.ndarray, levels: int, codebook: int, seed: int, iterations: int | None = None) -> Quantised:
    """Train the RQ-VAE for ``iterations`` epochs (default 50, and at least :data:`MIN_STEPS` steps) and
    return every item's codes."""
    check_sizes(len(x), levels, codebook)
    epochs = max(iterations or DEFAULT_EPOCHS, -(-MIN_STEPS // -(-len(x) // BATCH)))
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    mean, scale = x.mean(axis=0), float(x.std()) or 1.0
    data = torch.from_numpy(((x - mean) / scale).astype(np.float32))
    model = ResidualVAE(x.shape[1], levels, codebook)
    model.restart(data, generator, dead_only=False)
    optimiser = torch.optim.Adam(model.parameters(), lr=LR)
    restarts = 0
    for _ in range(epochs):
        for batch in torch.randperm(len(data), generator=generator).split(BATCH):
            optimiser.zero_grad(set_to_none=True)
            model.loss(data[batch]).backward()
            optimiser.step()
        restarts += model.restart(data, generator, dead_only=True)
    model.eval()
    with torch.no_grad():
        codes, _, picked = model.quantise(model.encoder(data))
        partial = torch.cumsum(torch.stack(picked), dim=0)
        errors = [relative_error(x, model.decoder(p).numpy() * scale + mean) for p in partial]
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.numpy().tobytes())
    settings = {"epochs": epochs, "latent": LATENT, "hidden": HIDDEN, "beta": BETA, "batch_size": BATCH, "lr": LR,
                "dead_code_restarts": restarts}
    return Quantised(codes.numpy().astype(np.int64), errors, settings, digest.hexdigest())
