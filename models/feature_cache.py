"""The feature cache: what every early exit reads, computed once over the training texts.

With the backbone frozen, an exit's input never changes from one epoch to the next, so one pass of
the model stores per text what exits 1..L-1 read of their layer (`ExitHead.summarize`: the mean of
the real tokens, or the first token, `[L-1, H]`) and the final exit's output `[C]` (the distillation
target). Both go to `np.memmap` files on disk, written batch by batch: memory stays bounded by one
batch however many texts there are (67k SST-2 sentences x 5 layers x 384 floats = 0.5 GB on disk).
Exit heads then train for several epochs on the cache (models/head_training.py) without running a
transformer layer again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from exitserve.models.early_exit import EarlyExitModel
from exitserve.models.encoding import Encoded, collate
from exitserve.models.inference import length_batches

CACHE_BATCH_SIZE = 64


@dataclass
class FeatureCache:
    features: np.ndarray  # [N, L-1, H] float32 (a memmap): exit k's input for text i at [i, k]
    final: np.ndarray  # [N, C] float32 (a memmap): the final exit's output

    def __len__(self) -> int:
        return len(self.final)


@torch.inference_mode()
def cache_features(
    model: EarlyExitModel,
    samples: Sequence[Encoded],
    pad_id: int,
    directory: str | Path,
    batch_size: int = CACHE_BATCH_SIZE,
) -> FeatureCache:
    """One pass of `model` (in eval mode) over `samples`, streamed into memmaps in `directory`."""
    directory = Path(directory)
    early = model.num_layers - 1
    hidden_size = model.heads[-1].pooler.in_features
    features = np.memmap(directory / "features.f32", np.float32, "w+", shape=(len(samples), early, hidden_size))
    final = np.memmap(directory / "final.f32", np.float32, "w+", shape=(len(samples), model.num_outputs))
    device = next(model.parameters()).device
    with tqdm(total=len(samples), desc="caching exit features", unit="text") as bar:
        for idx in length_batches(samples, batch_size):
            batch = collate([samples[i] for i in idx], pad_id, device)
            mask = batch["attention_mask"]
            hidden = model.embed(batch["input_ids"], batch.get("token_type_ids"))
            attention = model.attention(hidden, mask)
            summaries = []
            for k in range(model.num_layers):
                hidden = model.run_layer(k, hidden, attention)
                if k < early:
                    summaries.append(model.heads[k].summarize(hidden, mask))
            logits, _ = model.exit_outputs(early, hidden, mask)
            features[idx] = torch.stack(summaries, 1).float().cpu().numpy()
            final[idx] = logits.float().cpu().numpy()
            bar.update(len(idx))
    features.flush()
    final.flush()
    return FeatureCache(features, final)


class CachedFeatures(Dataset):
    """The cache as training rows: `features` `[L-1, H]`, `final` `[C]` and, unless distilling, `labels`."""

    def __init__(self, cache: FeatureCache, labels: Sequence[float] | None, regression: bool):
        self.cache, self.regression = cache, regression
        dtype = torch.float32 if regression else torch.long
        self.labels = torch.tensor(labels, dtype=dtype) if labels is not None else None

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = {
            "features": torch.from_numpy(np.array(self.cache.features[i])),
            "final": torch.from_numpy(np.array(self.cache.final[i])),
        }
        if self.labels is not None:
            row["labels"] = self.labels[i]
        return row
