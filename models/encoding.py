"""Text -> token ids, and token ids -> right-padded batches.

Every sample carries its token type ids (0 for a text, 1 for the second text of a pair in BERT's
scheme); only the BERT family's embeddings read them.

`TextEncoder` tokenises with the model's own tokenizer as the `tokenizers` library runs it (what a
Hugging Face fast tokenizer calls underneath), from the checkpoint's `tokenizer.json` or from a loaded
Hugging Face tokenizer: a server needs neither transformers nor torch to tokenise, and both give the
same ids (tests check it on every family's tokenizer; a checkpoint's canaries check it at load).

Samples are kept as unpadded id lists (`Encoded`) until the moment a batch is formed, so any set of
samples (from one request or many) can be padded to exactly the length the batch needs. `pad_tokens`
is the one padding rule (numpy, so every runtime backend can take it); `collate` wraps it in torch
tensors for the model's forward (training, recording all layers, export checks).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer


class InputTooLong(ValueError):
    """An input longer than the model's maximum, when truncation is off."""


class EmptyInput(ValueError):
    """A text of which the tokenizer keeps nothing (e.g. only combining marks or private-use characters):
    the model would answer its special tokens alone."""


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    token_type_ids: list[int] | None = None  # None: all 0

    def __len__(self) -> int:
        return len(self.input_ids)


def _special_token(value: Any) -> str | None:
    """A special token as tokenizer_config.json stores it: a string, or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


class TextEncoder:
    """A model's tokenizer: texts (and pairs) -> `Encoded`, truncated to `max_length` tokens or refused.
    Two copies of the tokenizer, one truncating and one not, so concurrent calls never change each
    other's settings."""

    def __init__(self, tokenizer_json: str, pad_id: int, max_length: int):
        self.pad_id, self.max_length = pad_id, max_length
        self.plain = Tokenizer.from_str(tokenizer_json)
        self.plain.no_padding()
        self.plain.no_truncation()
        self.truncating = Tokenizer.from_str(tokenizer_json)
        self.truncating.no_padding()
        self.truncating.enable_truncation(max_length, strategy="longest_first")

    @classmethod
    def from_directory(cls, directory: Path, max_length: int) -> TextEncoder:
        """From a checkpoint's tokenizer.json (raises ValueError with the reason when it cannot)."""
        path = Path(directory) / "tokenizer.json"
        text = path.read_text()
        config_path = Path(directory) / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        pad = _special_token(config.get("pad_token")) if isinstance(config, dict) else None
        tokenizer = Tokenizer.from_str(text)
        pad_id = tokenizer.token_to_id(pad) if pad else None
        if pad_id is None:
            raise ValueError(f"{config_path} names no padding token the tokenizer knows ({pad!r})")
        return cls(text, pad_id, max_length)

    @classmethod
    def from_hf(cls, tokenizer, max_length: int) -> TextEncoder:
        """From a loaded Hugging Face fast tokenizer (training and the library's torch path)."""
        return cls(tokenizer.backend_tokenizer.to_str(), tokenizer.pad_token_id, max_length)

    def vocab(self) -> dict[str, int]:
        """Token -> id, added tokens included (as a Hugging Face tokenizer's `get_vocab`)."""
        return self.plain.get_vocab(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self.plain.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None, truncate: bool = True) -> list[Encoded]:
        """Tokenise; inputs over `max_length` tokens are truncated, or rejected (InputTooLong) when
        `truncate` is off; a text (or pair) the tokenizer keeps nothing of is rejected (EmptyInput)."""
        tokenizer = self.truncating if truncate else self.plain
        if len(texts) == 1:  # encode_batch hands even one input to a thread pool: slower for one
            batch = [tokenizer.encode(texts[0], pairs[0] if pairs is not None else None)]
        else:
            batch = tokenizer.encode_batch(list(zip(texts, pairs, strict=True)) if pairs is not None else list(texts))
        sides = ("text", "text_pair") if pairs is not None else ("text",)
        out = []
        for i, enc in enumerate(batch):
            if len(enc.ids) > self.max_length:
                raise InputTooLong(f"input {i} has {len(enc.ids)} tokens; the model takes at most {self.max_length}")
            kept = set(enc.sequence_ids)  # which sides have tokens (None: the special tokens)
            empty = next((side for n, side in enumerate(sides) if n not in kept), None)
            if empty is not None:
                raise EmptyInput(f"{empty}[{i}]: empty text (the tokenizer keeps none of its characters)")
            out.append(Encoded(enc.ids, enc.type_ids))
        return out


def encode(
    tokenizer, texts: Sequence[str], pairs: Sequence[str] | None = None, max_length: int = 128, truncate: bool = True
) -> list[Encoded]:
    """`TextEncoder.encode` for a `TextEncoder` or a Hugging Face tokenizer (the library's callers)."""
    encoder = tokenizer if isinstance(tokenizer, TextEncoder) else TextEncoder.from_hf(tokenizer, max_length)
    if encoder.max_length != max_length:
        encoder = TextEncoder(encoder.plain.to_str(), encoder.pad_id, max_length)
    return encoder.encode(texts, pairs, truncate)


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


def mean_pool_weights(lengths: np.ndarray, width: int) -> np.ndarray:
    """`[B, 1, width]` float32: 1/length on each row's real tokens, 0 on padding (what mean-pooling exits
    multiply by), computed in float32 as the composed ONNX graph computes it."""
    lengths = np.asarray(lengths)
    mask = attention_mask(lengths, width).astype(np.float32)
    return (mask / lengths[:, None].astype(np.float32))[:, None, :]


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


def collate(samples: Sequence[Encoded], pad_id: int, device: Any = "cpu") -> dict:
    """`pad_tokens` as the model's keyword arguments (torch tensors): input_ids, attention_mask (and
    token_type_ids). torch is imported here, not at the top: serving never collates."""
    import torch

    batch = pad_tokens(samples, pad_id)
    out = {"input_ids": torch.from_numpy(batch.input_ids), "attention_mask": torch.from_numpy(batch.attention_mask)}
    if batch.token_type_ids is not None:
        out["token_type_ids"] = torch.from_numpy(batch.token_type_ids)
    return {k: v.to(device) for k, v in out.items()}
