"""The PyTorch backend: the `EarlyExitModel` itself, on its device (CPU or GPU). Training always uses
torch; this backend serves and evaluates the same weights layer by layer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from exitserve.models.backbones import AttentionInputs
from exitserve.models.backends.base import Backend, ExitOutput
from exitserve.models.early_exit import EarlyExitModel
from exitserve.models.encoding import Encoded, attention_mask, pad_tokens


@dataclass
class TorchAttention:
    mask: torch.Tensor  # [B, S] 0/1: what the exits pool over
    layer_inputs: AttentionInputs  # what the transformer layers take


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model: EarlyExitModel, pad_id: int):
        self.model, self.pad_id = model.eval(), pad_id
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.num_layers, self.num_outputs = model.num_layers, model.num_outputs

    @torch.inference_mode()
    def embed(self, samples: Sequence[Encoded]) -> torch.Tensor:
        tokens = pad_tokens(samples, self.pad_id)
        types = tokens.token_type_ids
        return self.model.embed(
            torch.from_numpy(tokens.input_ids).to(self.device),
            torch.from_numpy(types).to(self.device) if types is not None else None,
        )

    @torch.inference_mode()
    def attention(self, lengths: np.ndarray) -> TorchAttention:
        width = int(max(lengths))
        mask = torch.from_numpy(attention_mask(lengths, width)).to(self.device)
        shape = torch.empty(len(lengths), width, 0, dtype=self.dtype, device=self.device)  # sizes, dtype, device
        # no padding (a single row, or rows of one length: most scheduler steps): the layers get no mask,
        # as Hugging Face's own rule gives them, without its checks and a host sync on the mask
        padded = int(min(lengths)) < width
        return TorchAttention(mask, self.model.attention(shape, mask if padded else None))

    @torch.inference_mode()
    def layer(
        self, index: int, hidden: torch.Tensor, attention: TorchAttention, need_exit: bool = True
    ) -> tuple[torch.Tensor, ExitOutput | None]:
        hidden = self.model.run_layer(index, hidden, attention.layer_inputs)
        if not need_exit:
            return hidden, None
        logits, lte = self.model.exit_outputs(index, hidden, attention.mask)
        return hidden, ExitOutput(logits.float().cpu().numpy(), lte.float().cpu().numpy() if lte is not None else None)

    def select(self, hidden: torch.Tensor, keep: np.ndarray, width: int) -> torch.Tensor:
        return hidden[torch.from_numpy(np.asarray(keep)).to(self.device), :width]

    def rows(self, hidden: torch.Tensor, lengths: Sequence[int]) -> list[torch.Tensor]:
        return [hidden[i, :n] for i, n in enumerate(lengths)]

    @torch.inference_mode()
    def stack(self, rows: Sequence[torch.Tensor]) -> torch.Tensor:
        width = max(len(r) for r in rows)
        if len(rows) == 1:
            return rows[0].unsqueeze(0)  # a view: nothing to pad
        if all(len(r) == width for r in rows):
            return torch.stack(list(rows))
        out = rows[0].new_zeros(len(rows), width, rows[0].shape[-1])
        for i, row in enumerate(rows):
            out[i, : len(row)] = row
        return out
