"""Text -> token ids, and token ids -> padded tensors.

Samples are kept as unpadded id lists (`Encoded`) until the moment a batch is formed, so any set of
samples (from one request or many) can be padded to exactly the length the batch needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


class InputTooLong(ValueError):
    """An input longer than the model's maximum, when truncation is off."""


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    token_type_ids: list[int] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    pairs: Sequence[str] | None = None,
    max_length: int = 128,
    truncate: bool = True,
) -> list[Encoded]:
    """Tokenise; inputs over `max_length` tokens are truncated, or rejected when `truncate` is off."""
    batch = tokenizer(
        list(texts),
        list(pairs) if pairs is not None else None,
        truncation="longest_first" if truncate else False,
        max_length=max_length if truncate else None,
        padding=False,
    )
    types = batch.get("token_type_ids")
    out = []
    for i, ids in enumerate(batch["input_ids"]):
        if len(ids) > max_length:
            raise InputTooLong(f"input {i} has {len(ids)} tokens; the model takes at most {max_length}")
        out.append(Encoded(list(ids), list(types[i]) if types is not None else None))
    return out


def collate(samples: Sequence[Encoded], pad_id: int, device: torch.device | str = "cpu") -> dict:
    """Right-pad to the longest sample: input_ids, attention_mask (and token_type_ids)."""
    length = max(len(s) for s in samples)
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), length), dtype=torch.long)
    types = torch.zeros((len(samples), length), dtype=torch.long) if samples[0].token_type_ids else None
    for row, sample in enumerate(samples):
        n = len(sample)
        ids[row, :n] = torch.tensor(sample.input_ids)
        mask[row, :n] = 1
        if types is not None and sample.token_type_ids is not None:
            types[row, :n] = torch.tensor(sample.token_type_ids)
    batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if types is not None:
        batch["token_type_ids"] = types.to(device)
    return batch
