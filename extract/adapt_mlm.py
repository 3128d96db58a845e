"""Masked-language-model adaptation of text encoders (BERT's second-round pretraining, paper 001 Table 8)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from extract.adapt_objective import Masker, Objective, ObjectiveDefaults, _seeded, register_objective
from extract.encoder import Encoder

@register_objective
class MaskedLanguageModel(Objective):
    """BERT's MLM: 15% of the tokens are targets; of those 80% become [MASK], 10% a random token, 10% stay."""

    name = "mlm"
    modality = "text"
    families = ("bert", "roberta")
    defaults = ObjectiveDefaults(mask_ratio=0.15, lr=5e-5, batch_size=32, weight_decay=0.01, betas=(0.9, 0.999))

    def extra_settings(self, encoder: Encoder) -> dict:
        return {"masking": "80% [MASK] / 10% random token / 10% unchanged"}

    def pretraining_model(self, encoder: Encoder, settings: dict) -> nn.Module:
        from transformers import AutoModelForMaskedLM

        with _seeded(settings["seed"]):
            model = AutoModelForMaskedLM.from_config(copy.deepcopy(encoder.model.config))
        getattr(model, model.base_model_prefix).load_state_dict(encoder.model.state_dict())
        return model

    def masker(self, encoder: Encoder, settings: dict) -> Masker:
        from transformers import DataCollatorForLanguageModeling

        tokenizer = encoder.preprocessor.tokenizer
        collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=settings["mask_ratio"])
        special = torch.tensor(tokenizer.all_special_ids)

        def mask(inputs: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
            ids = inputs["input_ids"]
            masked, labels = collator.torch_mask_tokens(ids.clone(), special_tokens_mask=torch.isin(ids, special))
            kwargs = {"input_ids": masked, "attention_mask": inputs["attention_mask"], "labels": labels}
            return kwargs, int((labels != -100).sum())

        return mask

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The library's MLM loss, with the vocabulary head run on the masked positions only.

        Over all positions the head (hidden x 30522 logits) costs about as much as
        the whole MiniLM encoder; 85% of those logits would be discarded.
        """
        base = getattr(model, model.base_model_prefix)
        head = next(module for name, module in model.named_children() if name != model.base_model_prefix)
        hidden = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        targets = batch["labels"] != -100
        return nn.functional.cross_entropy(head(hidden[targets]).float(), batch["labels"][targets])

    def save_extras(self, encoder: Encoder, folder: Path) -> None:
        encoder.preprocessor.tokenizer.save_pretrained(str(folder))
