"""``timm:MODEL[.TAG]`` and ``timm:hf-hub:ORG/NAME``: any timm model as an image encoder.

timm's own pretrained config says where a name's weights are (its ``hf_hub_id``) and how
pictures are preprocessed (``resolve_data_config``), so nothing is re-typed here. The
split into stem / blocks / pool is the family's own for the families the registry
already knows (ResNet, Swin, EfficientNet, ViT / DeiT / DINOv2), and otherwise derived
from the module structure: the blocks are the children of the model's block container
(``blocks``: EVA, BEiT, ...; ``stages``: ConvNeXt, ...; ``layers``), the stem is
``forward_features`` up to the first of them (whose call arguments, such as EVA's rotary
embedding, are kept), and the pool is the norm ``forward_features`` applies after them,
then ``forward_head(pre_logits=True)``. Each build checks on a blank picture that this
equals ``forward_features``; a model where no such cut does still extracts through its
own forward, with no blocks (E2E, caches and adapters then refuse, naming the family).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from extract import hub
from extract.encoder import Encoder, Hidden, Part
from extract.image import TIMM_SPLITS, _pool_fn, build_timm, pooled_width
from extract.names import LibraryName
from extract.registry import EncoderConfig, WeightsSpec
from featurestore.errors import UserError

KNOWN = {"resnet": "resnet", "swin_transformer": "swin", "efficientnet": "efficientnet",
         "vision_transformer": "vit"}  # timm module -> the registry family whose split it uses
CONTAINERS = ("blocks", "stages", "layers")
POSTS = ((), ("norm",), ("norm_pre",), ("conv_head", "bn2"))  # what forward_features may apply after the blocks
# derived families, by the layout of the states between blocks
TOKENS, NCHW, NHWC = "timm-tokens", "timm-nchw", "timm-nhwc"


def _meta_model(architecture: str, hparams: dict) -> nn.Module:
    import timm

    with torch.device("meta"):
        return timm.create_model(architecture, pretrained=False, **hparams)


def _container(model: nn.Module) -> tuple[str, nn.Module] | None:
    return next(((n, getattr(model, n)) for n in CONTAINERS
                 if isinstance(getattr(model, n, None), (nn.Sequential, nn.ModuleList))), None)


def family_of(model: nn.Module) -> str:
    """The registry family of a timm model: a known one by its module, else derived from its structure."""
    module = type(model).__module__.rsplit(".", 1)[-1]
    if module in KNOWN and (module != "efficientnet" or hasattr(model, "conv_head")):
        return KNOWN[module]
    found = _container(model)
    if found and found[0] == "blocks" and hasattr(model, "patch_embed"):
        return TOKENS
    return NHWC if getattr(model, "output_fmt", "NCHW") == "NHWC" else NCHW


def _resolve(parsed: LibraryName, local: Path | None) -> tuple[str, dict, str | None]:
    """(architecture, its arguments, default hub weights) of a timm name."""
    import timm

    if parsed.repo is not None:  # timm:hf-hub:ORG/NAME: the repository's config names the architecture
        path = hub.config_file(parsed.key, parsed.repo, local=local)
        config = json.loads(path.read_text()) if path else {}
        if "architecture" not in config:
            raise UserError(f"--encoder {parsed.spelled}: {parsed.repo} is not a timm model (its config.json names "
                            "no architecture); try hf:ORG/NAME")
        return config["architecture"], config.get("model_args") or {}, parsed.repo
    base = parsed.model.split(".")[0]
    if not timm.is_model(base):
        near = timm.list_models(f"*{base[:6]}*")[:8]
        raise UserError(f"--encoder {parsed.spelled}: timm has no model {base!r}"
                        + (f"; similar: {', '.join(near)}" if near else "") + " (timm.list_models('PATTERN'))")
    try:
        cfg = timm.models.get_pretrained_cfg(parsed.model) if "." in parsed.model else None
    except RuntimeError:
        cfg = None
    if "." in parsed.model and cfg is None:
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{base}.*")]
        raise UserError(f"--encoder {parsed.spelled}: timm has no pretrained tag {parsed.model!r}; tags of {base}: "
                        f"{', '.join(tags) or 'none'}")
    model = _meta_model(parsed.model, {})
    return parsed.model, {}, model.pretrained_cfg.get("hf_hub_id")


def library_config(parsed: LibraryName, modality: str | None, local: Path | None = None) -> EncoderConfig:
    """The config of a timm name, derived from timm's registry and a meta-device build (no weights read);
    ``local``: a ``--weights`` folder whose config.json names a ``timm:hf-hub:`` name's architecture offline."""
    architecture, hparams, hub_id = _resolve(parsed, local)
    model = _meta_model(architecture, hparams)
    family = family_of(model)
    poolings = ("cls", "mean", "pooled") if family in ("vit", TOKENS) else ("pooled", "mean")
    config = EncoderConfig(parsed.key, "image", family, architecture, pooled_width(model, "pooled"), 0, "pooled",
                           poolings, "extract.timm_any:build_timm_any", hub_id=hub_id, hparams=hparams,
                           library=parsed.spelled)
    encoder = build_timm_any(config, None, "pooled", meta=True)
    return dataclasses.replace(config, depth=encoder.depth)


def build_timm_any(config: EncoderConfig, spec: WeightsSpec | None, pooling: str, *, meta: bool = False,
                   **_: Any) -> Encoder:
    """A timm model by its library name: the family's split where known, else the derived one.

    Example:
        >>> enc = create_encoder("timm:convnext_tiny.fb_in1k")
    """
    return build_timm(config, spec, pooling, meta=meta,
                      split=None if config.family in TIMM_SPLITS else derived_split)


def _stem(model: nn.Module, first: nn.Module) -> Part:
    """``forward_features`` up to ``first``: the states entering it and that call's other arguments."""

    class Reached(Exception):
        pass

    def stem(pixels: torch.Tensor) -> Hidden:
        seen: dict[str, Any] = {}

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            seen["call"] = (args, dict(kwargs))
            raise Reached

        handle = first.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            model.forward_features(pixels)
        except Reached:
            pass
        finally:
            handle.remove()
        args, kwargs = seen["call"]
        return Hidden(args[0], call=(args[1:], kwargs))

    entry = getattr(model, "patch_embed", None)
    return Part(stem, entry=entry if isinstance(entry, nn.Module) else getattr(model, "stem", None))


def _blocks(container: nn.Module, constant: list) -> list[Part]:
    """One block per child, called with the stem's captured arguments (a restored cache: the probe's, which
    for a fixed picture size are the same: EVA's rotary embedding depends on the grid alone)."""

    def make(block: nn.Module) -> Part:
        def run(hidden: Hidden) -> Hidden:
            args, kwargs = hidden.call if hidden.call is not None else (constant[0] if constant else ((), {}))
            return hidden.with_states(block(hidden.states, *args, **kwargs))

        return Part(run, block=block)

    return [make(block) for block in container]


def _post(model: nn.Module, names: tuple[str, ...]) -> Part:
    modules = [getattr(model, n) for n in names]

    def run(x: torch.Tensor) -> torch.Tensor:
        for module in modules:
            x = module(x)
        return x

    return Part(run, **{n: m for n, m in zip(names, modules)})


def _mean(model: nn.Module, family: str):
    if family == TOKENS:
        prefix = int(getattr(model, "num_prefix_tokens", 1))
        return lambda x: x[:, prefix:].mean(1)
    return (lambda x: x.mean((1, 2))) if family == NHWC else (lambda x: x.mean((2, 3)))


def derived_split(model: nn.Module, pooling: str,
                  probe: torch.Tensor | None) -> tuple[nn.Module, list[nn.Module], nn.Module]:
    """Stem / the container's children / norm + head, checked against ``forward_features`` on ``probe``."""
    found = _container(model)
    posts = [names for names in POSTS if all(isinstance(getattr(model, n, None), nn.Module) for n in names)]
    if found is None or not posts:
        return _unsplit(model, pooling)
    constant: list = []
    stem, blocks = _stem(model, found[1][0]), _blocks(found[1], constant)
    post = _post(model, posts[0])
    if probe is not None:
        post = _checked_post(model, stem, blocks, posts, probe, constant)
        if post is None:
            return _unsplit(model, pooling)
    pool = Part(_pool_fn(lambda x: model.forward_head(x, pre_logits=True), _mean(model, family_of(model)), pooling,
                         post), post=post)
    return stem, blocks, pool


def _checked_post(model: nn.Module, stem: Part, blocks: list[Part], posts: list[tuple[str, ...]],
                  probe: torch.Tensor, constant: list) -> Part | None:
    """The first candidate norm after the blocks with which the split equals ``forward_features``, or None."""
    with torch.inference_mode():
        hidden = stem(probe)
        constant.append(hidden.call)
        for block in blocks:
            hidden = block(hidden)
        reference = model.forward_features(probe)
        for names in posts:
            post = _post(model, names)
            out = post(hidden.states)
            if out.shape == reference.shape and torch.allclose(out, reference, rtol=1e-4, atol=1e-5):
                return post
    return None


def _unsplit(model: nn.Module, pooling: str) -> tuple[nn.Module, list[nn.Module], nn.Module]:
    """No cut found: ``forward_features`` is the stem, there are no blocks, the pool is the model's head."""
    stem = Part(lambda pixels: Hidden(model.forward_features(pixels)), model=model)
    pooled = lambda hidden: model.forward_head(hidden.states, pre_logits=True)  # noqa: E731
    return stem, [], Part(pooled)
