"""What ``featurestore encoders`` says of a name without downloading weights.

The listing names the library-name forms every model of timm, transformers and
sentence-transformers goes by, and each registry alias's library name (the same weights
by their library's name), so a user moving from ``swin-b`` to a ConvNeXt sees the
spelling to use. ``--info NAME`` describes one name from its config and a meta-device
build (nothing allocated, no weights read): modality, width, the stem / blocks / pool
split that caches, E2E, adapters and side networks use, pooling, weights and
preprocessing. Apart from the CLI so the printer stays free of torch.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from extract.encoder import Part
from extract.registry import EncoderConfig, get_encoder_config, meta_encoder, resolve_weights, weights_status

LIBRARY_FORMS = ("timm:MODEL[.TAG]", "timm:hf-hub:ORG/NAME", "hf:ORG/NAME[@REVISION]", "st:ORG/NAME[@REVISION]")
NO_WEIGHTS = ("unavailable offline", "random-init only")


def library_name_of(config: EncoderConfig) -> str | None:
    """The library name of an alias's weights (``swin-b`` -> ``timm:swin_base_patch4_window7_224.ms_in22k_ft_in1k``),
    or None where none reaches them (MAE and ViLT are not ``hf:`` text models; the tiny test
    configurations have no weights). The alias keeps its own pooling (``minilm-l6``: mean, not
    normalised; ``st:`` adds the model's Normalize); a CLIP / SigLIP tower is picked by ``--modality``."""
    if config.library or config.hub_id is None:
        return config.library
    hub_id = config.hub_id
    if config.builder == "extract.image:build_timm":
        return f"timm:{hub_id.removeprefix('timm/')}" if hub_id.startswith("timm/") else f"timm:hf-hub:{hub_id}"
    if config.builder == "extract.text:build_text":
        return f"{'st' if hub_id.startswith('sentence-transformers/') else 'hf'}:{hub_id}"
    if config.builder == "extract.vlm:build_vlm":
        return f"hf:{hub_id} --modality {config.modality}"
    return None


def _library_modules(part: nn.Module) -> list[str]:
    """The library modules a view uses, by class (views nested in a view are looked through)."""
    return [name for m in part.children() for name in (_library_modules(m) if isinstance(m, Part)
                                                        else [type(m).__name__])]


def _blocks(blocks: nn.ModuleList) -> str:
    """``12 x BertLayer``: runs of one kind, by each block's last module (a stage's downsampling comes first)."""
    runs: list[list[Any]] = []
    for block in blocks:
        kind = (_library_modules(block) or [type(block).__name__])[-1]
        if runs and runs[-1][1] == kind:
            runs[-1][0] += 1
        else:
            runs.append([1, kind])
    return " + ".join(f"{n} x {kind}" for n, kind in runs) or "none"


def _split(config: EncoderConfig, encoder: Any) -> dict[str, Any]:
    from extract.hf import FAMILY
    from extract.timm_any import NCHW, NHWC, TOKENS

    derived = config.family in (FAMILY, TOKENS, NCHW, NHWC)
    return {
        "stem": ", ".join(_library_modules(encoder.stem)) or "the model's input layers",
        "blocks": _blocks(encoder.blocks),
        "pool": " -> ".join([*_library_modules(encoder.pool), f"{encoder.pooling} pooling"]),
        "how": ("derived from the library's forward; checked on a probe when the weights load (a model it does "
                "not fit extracts pooled vectors with no blocks)") if derived else f"the {config.family} family's own",
    }


def _preprocessing(config: EncoderConfig, encoder: Any) -> dict[str, Any]:
    if encoder.preprocessor is not None:
        return encoder.preprocessor.describe()
    pictures = {"image_processor": "the one saved with the weights"}
    if config.modality == "image":
        return {"kind": "image", **pictures}
    text = {"kind": "text",
            "tokenizer": "the weights' own" + (f", else package:{config.tokenizer}" if config.tokenizer else ""),
            "max_tokens": "30 (--max-text-tokens)", "padding": "right; texts batched by length",
            "prompt": "none (--prompt TEXT)"}
    extra = {f"model_{key}": config.hparams[key] for key in ("max_seq_length", "prompts") if config.hparams.get(key)}
    return {**text, **extra, **(pictures if config.modality == "multimodal" else {})}


def _weights(config: EncoderConfig, weights: str | None) -> dict[str, str]:
    if weights:
        return {"source": resolve_weights(config, weights).source, "status": "given"}
    source = (f"package:{config.local_package}" if config.local_package else
              f"hub:{config.hub_id}" if config.hub_id else "none published")
    out = {"source": source, "status": weights_status(config)}
    if out["status"] in NO_WEIGHTS:
        out["fix"] = "pass --weights PATH (a weights file or model folder) or --random-init to extract"
    return out


def encoder_info(name: str, modality: str | None = None, weights: str | None = None) -> dict[str, Any]:
    """One name described from its config and a meta-device build; a library name whose config is neither
    cached nor reachable is refused (UserError) naming ``--weights FOLDER``."""
    config = get_encoder_config(name, modality, weights)
    encoder = meta_encoder(config)
    return {
        "name": config.name, "library_name": library_name_of(config), "modality": config.modality,
        "family": config.family, "architecture": config.architecture, "width": encoder.width,
        "depth": encoder.depth, "split": _split(config, encoder), "pooling": config.pooling,
        "poolings": list(config.poolings), "parameters": encoder.parameter_count(),
        "weights": _weights(config, weights), "preprocessing": _preprocessing(config, encoder),
    }


def info_text(info: dict[str, Any]) -> str:
    """``--info``'s table."""
    split, weights = info["split"], info["weights"]
    rows = [
        ("library name", info["library_name"] or "none (registry only)"),
        ("modality", info["modality"]),
        ("architecture", f"{info['architecture']} (family {info['family']})"),
        ("width", info["width"]),
        ("depth", f"{info['depth']} blocks"),
        ("split", f"stem: {split['stem']} | blocks: {split['blocks']} | pool: {split['pool']}"),
        ("", split["how"]),
        ("pooling", f"{info['pooling']} (choices: {', '.join(info['poolings'])}; --pooling)"),
        ("parameters", f"{info['parameters']:,}"),
        ("weights", f"{weights['source']}: {weights['status']}" + (f"; {weights['fix']}" if "fix" in weights else "")),
        ("preprocessing", "; ".join(f"{k} {v}" for k, v in info["preprocessing"].items() if k != "kind")),
    ]
    return "\n".join([info["name"], *(f"  {key:<14}{value}" for key, value in rows)])
