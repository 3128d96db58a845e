"""``st:ORG/NAME[@REVISION]``: a sentence-transformers model, its pooling and normalisation honoured.

A sentence-transformers folder is a transformers model plus a ``modules.json`` naming the
modules its ``encode`` runs: Transformer -> Pooling (``1_Pooling/config.json``: cls, mean
or last token) -> Normalize (optional). Those files are read here and the transformers
model is built by :mod:`extract.hf` with that pooling and normalisation, so the vectors are
``encode``'s without the sentence-transformers package. A module this tool does not run
(Dense, max pooling, ...) is refused, naming it. ``--max-text-tokens`` still cuts titles
(the model's ``max_seq_length`` is recorded beside it); the model's ``prompts`` are
recorded, and ``--prompt`` puts one before every text.
"""

from __future__ import annotations

from pathlib import Path

from extract.hf import model_files, text_config
from extract.names import LibraryName
from extract.registry import EncoderConfig
from featurestore.errors import UserError

RUNS = ("Transformer", "Pooling", "Normalize")
POOLING_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                 "pooling_mode_lasttoken": "last-token"}
MODE_NAMES = {"cls": "cls", "mean": "mean", "lasttoken": "last-token"}  # sentence-transformers 6: "pooling_mode"


def _pooling(parsed: LibraryName, config: dict) -> str:
    if "pooling_mode" in config:
        modes = config["pooling_mode"]
        modes = [modes] if isinstance(modes, str) else list(modes)
        chosen = [MODE_NAMES[m] for m in modes if m in MODE_NAMES]
        others = [m for m in modes if m not in MODE_NAMES]
    else:
        chosen = [name for key, name in POOLING_MODES.items() if config.get(key)]
        others = [k for k, v in config.items() if k.startswith("pooling_mode_") and v and k not in POOLING_MODES]
    if len(chosen) != 1 or others:
        raise UserError(f"--encoder {parsed.spelled}: its Pooling module uses {', '.join(others + chosen) or 'none'}; "
                        "this tool runs one of cls, mean or last-token pooling: use hf:ORG/NAME with --pooling")
    return chosen[0]


def library_config(parsed: LibraryName, modality: str | None, local: Path | None = None) -> EncoderConfig:
    """The config of ``st:ORG/NAME`` from its modules.json, pooling config and transformers config (read from
    the ``--weights`` folder ``local`` when the repository is not cached)."""
    files = model_files(parsed, local)
    modules = files.json("modules.json")
    if not modules:
        raise UserError(f"--encoder {parsed.spelled}: {parsed.repo} has no modules.json, so it is not a "
                        "sentence-transformers model; use hf:ORG/NAME")
    kinds = {m["type"].rsplit(".", 1)[-1]: m.get("path", "") for m in modules}
    extra = [kind for kind in kinds if kind not in RUNS]
    if extra or kinds.get("Transformer", None) != "" or "Pooling" not in kinds:
        raise UserError(f"--encoder {parsed.spelled}: its modules {', '.join(kinds)} are not Transformer -> Pooling "
                        f"[-> Normalize] ({', '.join(extra) or 'layout'} not run here); use hf:ORG/NAME with --pooling")
    pooling = _pooling(parsed, files.json(f"{kinds['Pooling']}/config.json") or {})
    model_config = files.json("config.json")
    if model_config is None:
        raise UserError(f"--encoder {parsed.spelled}: {parsed.repo} has no config.json beside its modules.json")
    settings = files.json("sentence_bert_config.json") or {}
    prompts = (files.json("config_sentence_transformers.json") or {}).get("prompts") or {}
    return text_config(parsed, files, model_config, pooling=pooling, normalize="Normalize" in kinds,
                       extra={"max_seq_length": settings.get("max_seq_length"), "prompts": prompts})
