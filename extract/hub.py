"""Paper encoders' weights from the Hugging Face hub, through the cache timm and transformers share.

A registry name such as ``swin-b`` means one hub repository (``EncoderConfig.hub_id``).
Its weights are looked up in the hub cache first (``$HF_HUB_CACHE``, else
``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``): a cached snapshot is used with
no network at all, not even the freshness check a plain ``from_pretrained`` makes.
Otherwise the repository's config, tokenizer and one weights format (safetensors
when the repository has it) are downloaded once into that cache, with the hub
library's progress bar. Offline (``HF_HUB_OFFLINE=1``) and not cached is refused
with the two ways forward. Models are then always built from the local snapshot
folder, so the files hashed into the provenance are exactly the files loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import click

from featurestore.errors import UserError

WEIGHT_PATTERNS = (("*.safetensors",), ("pytorch_model*.bin", "*.pth"))  # first format the repo has wins
SIDE_FILES = ("*.json", "*.txt", "*.model")  # configs, tokenizers, vocabularies
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Snapshot:
    """A hub repository's files on this machine: ``folder`` at commit ``revision``."""

    repo_id: str
    folder: Path
    revision: str


def cache_dir() -> Path:
    """The hub cache in use now (read from the environment at every call, not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    """True when the user has switched the hub off (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _has_weights(folder: Path) -> bool:
    return any(folder.glob(pattern) for patterns in WEIGHT_PATTERNS for pattern in patterns)


def split_revision(repo_id: str) -> tuple[str, str | None]:
    """``ORG/NAME@REVISION`` -> (``ORG/NAME``, ``REVISION``); no ``@``: the default branch (None)."""
    repo, _, revision = repo_id.partition("@")
    return repo, revision or None


def cached_snapshot(repo_id: str, weights: bool = True) -> Snapshot | None:
    """The cached snapshot of ``repo_id[@REVISION]`` (holding a weights file unless ``weights`` is
    False: a config alone is enough to derive an encoder's config), or None; never uses the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, revision = split_revision(repo_id)
    try:
        folder = Path(snapshot_download(repo, revision=revision, cache_dir=cache_dir(), local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None
    return Snapshot(repo_id, folder, folder.name) if not weights or _has_weights(folder) else None


def config_file(name: str, repo_id: str, filename: str = "config.json", local: Path | None = None) -> Path | None:
    """A small file of ``repo_id`` (its config): from the cache, else from ``local``, else downloaded alone;
    None when the repository has no such file.

    ``local`` is a model folder given as ``--weights``: it stands in for an uncached repository (its
    files are the ones loaded), so an ``hf:`` name works offline from a folder. Offline, uncached
    and no folder is refused naming the folder way forward (a random init needs the config too).
    """
    snapshot = cached_snapshot(repo_id, weights=False)
    if snapshot is not None:
        return snapshot.folder / filename if (snapshot.folder / filename).is_file() else None
    if local is not None:
        return local / filename if (local / filename).is_file() else None
    if offline():
        raise UserError(f"encoder {name}: {filename} of {repo_id} is not in the hub cache {cache_dir()} and the hub "
                        "is switched off (HF_HUB_OFFLINE); pass --weights FOLDER holding its config.json and "
                        "weights (--random-init needs the config.json too), or unset HF_HUB_OFFLINE to fetch it")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    repo, revision = split_revision(repo_id)
    try:
        return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=cache_dir()))
    except EntryNotFoundError:
        return None
    except Exception as err:  # noqa: BLE001 - network, auth and hub errors vary widely
        raise refusal(name, repo_id, f"could not be read ({type(err).__name__}: "
                                     f"{str(err).splitlines()[0][:160] if str(err) else 'no message'})") from err


def availability(repo_id: str) -> str:
    """``cached``, ``downloadable`` (fetched on first use) or ``unavailable offline``; no network."""
    if cached_snapshot(repo_id) is not None:
        return "cached"
    return "unavailable offline" if offline() else "downloadable"


def refusal(name: str, repo_id: str, why: str) -> UserError:
    """The one-line refusal when a hub default cannot be had: the reason, then both ways forward."""
    return UserError(f"encoder {name} has no weights on this machine: {repo_id} {why}; pass --weights PATH "
                     "(a weights file or model folder) or --random-init for an untrained model")


def check_reachable(name: str, repo_id: str) -> None:
    """Refuse now, before any work, when the weights are neither cached nor downloadable."""
    if offline() and cached_snapshot(repo_id) is None:
        raise refusal(name, repo_id, f"is not in the hub cache {cache_dir()} and the hub is switched off "
                                     "(HF_HUB_OFFLINE)")


def fetch(name: str, repo_id: str) -> Snapshot:
    """The snapshot of ``repo_id``: from the cache, else downloaded once (with a progress bar)."""
    snapshot = cached_snapshot(repo_id)
    if snapshot is not None:
        return snapshot
    check_reachable(name, repo_id)
    from huggingface_hub import HfApi, snapshot_download

    click.echo(f"downloading the weights of {name} from the hub ({repo_id}) into {cache_dir()}, once", err=True)
    repo, revision = split_revision(repo_id)
    try:
        files = [f.rfilename for f in HfApi().model_info(repo, revision=revision).siblings or []]
        weights = next((p for p in WEIGHT_PATTERNS if any(Path(f).match(g) for f in files for g in p)), ())
        if not weights:
            raise refusal(name, repo_id, "holds no weights file this tool reads (.safetensors, .bin, .pth)")
        folder = Path(snapshot_download(repo, revision=revision, cache_dir=cache_dir(),
                                        allow_patterns=[*SIDE_FILES, *weights]))
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - network, auth and hub errors vary widely
        raise refusal(name, repo_id, f"could not be downloaded ({type(err).__name__}: "
                                     f"{str(err).splitlines()[0][:160] if str(err) else 'no message'})") from err
    return Snapshot(repo_id, folder, folder.name)
