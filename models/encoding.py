"""Text -> token ids, and token ids -> right-padded batches.

Samples are kept as unpadded id lists (`Encoded`) until the moment a batch is formed, so any set of
samples (from one request or many) can be padded to exactly the length the batch needs. `pad_tokens`
is the one padding rule (numpy, so every runtime backend can take it); `collate` wraps it in torch
tensors for the model's forward (training, recording all layers, export checks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase


class InputTooLong(ValueError):
    """An input longer than the model's maximum, when truncation is off."""


class EmptyInput(ValueError):
    """A text of which the tokenizer keeps nothing (e.g. only combining marks or private-use characters):
    the model would answer its special tokens alone."""


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
    """Tokenise; inputs over `max_length` tokens are truncated, or rejected when `truncate` is off; a text
    (or pair) the tokenizer keeps nothing of is rejected (EmptyInput)."""
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
        sides = ("text", "text_pair") if pairs is not None else ("text",)
        kept = set(batch.sequence_ids(i)) if batch.is_fast else set(range(len(sides)))  # which sides have tokens
        empty = next((side for n, side in enumerate(sides) if n not in kept), None)
        if empty is not None:
            raise EmptyInput(f"{empty}[{i}]: empty text (the tokenizer keeps none of its characters)")
        out.append(Encoded(list(ids), list(types[i]) if types is not None else None))
    return out


@dataclass(frozen=True)
class TokenBatch:
    """Right-padded token ids of a batch (int64): `[B, S]`, `S` = the longest sample."""

    input_ids: np.ndarray
    token_type_ids: np.ndarray | None
    lengths: np.ndarray  # [B]

    @property
    def attention_mask(self) -> np.ndarray:
        return attention_mask(self.lengths, self.input_ids.shape[1])


def attention_mask(lengths: np.ndarray, width: int) -> np.ndarray:
    """`[B, width]` int64: 1 on each row's first `length` positions (its real tokens), 0 on padding."""
    return (np.arange(width)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)


def pad_tokens(samples: Sequence[Encoded], pad_id: int) -> TokenBatch:
    """Right-pad to the longest sample (padding never changes a row's real tokens' results)."""
    lengths = np.array([len(s) for s in samples], dtype=np.int64)
    ids = np.full((len(samples), int(lengths.max())), pad_id, dtype=np.int64)
    types = np.zeros_like(ids) if samples[0].token_type_ids is not None else None
    for row, sample in enumerate(samples):
        ids[row, : len(sample)] = sample.input_ids
        if types is not None and sample.token_type_ids is not None:
            types[row, : len(sample)] = sample.token_type_ids
    return TokenBatch(ids, types, lengths)


def collate(samples: Sequence[Encoded], pad_id: int, device: torch.device | str = "cpu") -> dict:
    """`pad_tokens` as the model's keyword arguments: input_ids, attention_mask (and token_type_ids)."""
    batch = pad_tokens(samples, pad_id)
    out = {"input_ids": torch.from_numpy(batch.input_ids), "attention_mask": torch.from_numpy(batch.attention_mask)}
    if batch.token_type_ids is not None:
        out["token_type_ids"] = torch.from_numpy(batch.token_type_ids)
    return {k: v.to(device) for k, v in out.items()}
