"""Tokenised calibration batches, shared by every calibration pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class Batch:
    """One padded batch: ids and mask [batch, seq] on the model's device, and its real-token count."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    tokens: int


def batches(tokenizer, texts: list[str], *, seq_len: int, batch_size: int, device: torch.device) -> Iterator[Batch]:
    """Yields right-padded batches of at most `seq_len` tokens per text, in the order given."""
    tokenizer.padding_side = "right"
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[start : start + batch_size],
            truncation=True,
            max_length=seq_len,
            padding=True,
            return_tensors="pt",
        )
        mask = enc["attention_mask"]
        yield Batch(enc["input_ids"].to(device), mask.to(device), int(mask.sum()))
