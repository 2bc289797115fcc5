"""The early-exit model (BERxiT): a pretrained encoder with an exit head after every layer.

    input ids ──embed──> h0 ──layer 1──> h1 ──layer 2──> h2 ... ──layer L──> hL
                                          │               │                   │
                                        exit 1          exit 2     ...      exit L (the final classifier)
                                          │               │                   │
                                 logits, LTE conf   logits, LTE conf     logits, LTE conf

- `ExitHead` (one per layer): pooling, pooler (dense + tanh, initialised from the backbone's
  pretrained pooler when it has one), dropout, linear -> C logits (1 for regression).
  The final classifier (exit L) pools the first token: exactly the stock Hugging Face
  `*ForSequenceClassification` head, so a trained model exports to one (models/export.py), and a
  stock classifier imports as one (models/hf_classifier.py). Its activation is the family's:
  tanh, or relu for DistilBERT (`final_activation`, stored in the checkpoint).
  Early exits 1..L-1 pool the masked mean of the real tokens by default (`pooling="cls"` gives the
  BERxiT reference code's first-token pooling): on sentence-embedding backbones the first token is
  useless early on -- in all-MiniLM-L6-v2 (trained with mean pooling) its state at layers 1-3 is
  nearly the same for every input (std 0.001 across SST-2 sentences), and first-token exits 1-3
  stayed at chance (0.509 dev accuracy) after a full SST-2 fine-tune.
- `lte` (optional, shared by all layers): one linear layer + sigmoid over an exit's pooled state;
  it predicts how trustworthy that exit is (BERxiT's learned-to-exit module).

`forward` runs every layer and returns every exit's output (training and "record all layers").
`embed`, `attention` (once per batch), `run_layer` and `exit_outputs` are the pieces the torch
runtime backend (models/backends/torch_backend.py) drives one layer at a time.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig

from exitserve.models.answers import AllExits
from exitserve.models.backbones import AttentionInputs, LayerStepper, classifier_activation, resolve_backbone

POOLINGS = ("mean", "cls")
# The final exit's activation after its dense layer: tanh (BERT's pooler, RoBERTa's and MPNet's
# classification heads) or relu (DistilBERT's pre_classifier). Early exits always use tanh.
ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu}


class ExitHead(nn.Module):
    """pooling -> dense -> activation -> dropout -> linear. `summarize` (the pooling) and
    `from_summary` (the rest) are separate so exits can be trained on cached summaries."""

    def __init__(
        self, hidden_size: int, num_outputs: int, dropout: float, pooling: str, activation: str = "tanh"
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        self.pooling = pooling
        self.activation = activation
        self.pooler = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_outputs)

    def summarize(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """What this exit reads of a layer's output: `[B, H]`."""
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1)

    def from_summary(self, summary: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits `[B, C]` and the pooled state `[B, H]` (what the LTE module reads)."""
        pooled = ACTIVATIONS[self.activation](self.pooler(summary))
        return self.classifier(self.dropout(pooled)), pooled

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.from_summary(self.summarize(hidden, attention_mask))


def lte_confidence(lte: nn.Linear, pooled: torch.Tensor) -> torch.Tensor:
    """The LTE module's confidence `[B]` in an exit, from that exit's pooled state."""
    return torch.sigmoid(lte(pooled)).squeeze(-1)


class EarlyExitModel(nn.Module):
    def __init__(
        self, encoder: nn.Module, num_outputs: int, use_lte: bool, pooling: str = "mean",
        final_activation: str = "tanh",
    ):
        super().__init__()
        self.encoder = encoder
        self.stepper = LayerStepper(encoder)
        config = encoder.config
        hidden = config.hidden_size if hasattr(config, "hidden_size") else config.dim
        dropout = getattr(config, "hidden_dropout_prob", getattr(config, "dropout", 0.1))
        self.num_layers = self.stepper.num_layers
        self.num_outputs = num_outputs
        self.pooling = pooling
        self.final_activation = final_activation
        early = self.num_layers - 1
        self.heads = nn.ModuleList(
            [ExitHead(hidden, num_outputs, dropout, pooling) for _ in range(early)]
            + [ExitHead(hidden, num_outputs, dropout, "cls", final_activation)]
        )
        self.lte = nn.Linear(hidden, 1) if use_lte else None

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_backbone(
        cls, backbone: str, num_outputs: int, use_lte: bool, pooling: str = "mean"
    ) -> EarlyExitModel:
        """A fresh model on pretrained weights; exit poolers copy the pretrained pooler if any.
        The final exit's activation is the family's stock classifier's (so it exports to one)."""
        encoder = AutoModel.from_pretrained(resolve_backbone(backbone))
        model = cls(encoder, num_outputs, use_lte, pooling, classifier_activation(encoder.config.model_type))
        pretrained = model.stepper.pretrained_pooler()
        if pretrained is not None:
            for head in model.heads:
                head.pooler.load_state_dict(pretrained.state_dict())
        return model

    @classmethod
    def from_config(
        cls, config: PretrainedConfig, num_outputs: int, use_lte: bool, pooling: str = "mean",
        final_activation: str = "tanh",
    ) -> EarlyExitModel:
        """An uninitialised model of the given shape (weights are loaded afterwards)."""
        return cls(AutoModel.from_config(config), num_outputs, use_lte, pooling, final_activation)

    @classmethod
    def backbone_config(cls, backbone: str) -> PretrainedConfig:
        return AutoConfig.from_pretrained(resolve_backbone(backbone))

    @property
    def config(self) -> PretrainedConfig:
        return self.encoder.config

    @torch.no_grad()
    def start_regression_at(self, value: float) -> None:
        """Every regressor's bias starts at `value` (the mean training label), so training begins at the
        mean answer. From 0, on STS-B's 0-5 scale, a bias moving ~lr per step cannot reach the mean (2.7):
        the backbone was bent instead to output the constant from every pooled state, and all layers
        collapsed (experiment 3's weighted run: final-layer Spearman 0.546; docs/RESULTS.md)."""
        for head in self.heads:
            head.classifier.bias.fill_(value)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """backbone, exits (1..n-1), final (exit n), lte: what training strategies freeze or train."""
        return {
            "backbone": list(self.encoder.parameters()),
            "exits": [p for head in self.heads[:-1] for p in head.parameters()],
            "final": list(self.heads[-1].parameters()),
            "lte": list(self.lte.parameters()) if self.lte is not None else [],
        }

    # ---- the steps layer-by-layer inference drives ---------------------------------------------
    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.stepper.embed(input_ids, token_type_ids)

    def attention(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> AttentionInputs:
        """The attention inputs of a batch (mask, position bias), built once and used by every layer."""
        return self.stepper.attention(hidden, attention_mask)

    def run_layer(self, index: int, hidden: torch.Tensor, attention: AttentionInputs) -> torch.Tensor:
        """Transformer layer `index` (0-based)."""
        return self.stepper.layer(index, hidden, attention)

    def exit_outputs(
        self, index: int, hidden: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Exit `index` (0-based) on layer index+1's output: logits `[B, C]` and LTE conf `[B]`."""
        logits, pooled = self.heads[index](hidden, attention_mask)
        lte = lte_confidence(self.lte, pooled) if self.lte is not None else None
        return logits, lte

    # ---- every layer at once ------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        detach_backbone: bool = False,
    ) -> AllExits:
        """Run all layers and every exit. `detach_backbone` stops exit losses from reaching the
        encoder (two-stage's second stage)."""
        hidden = self.embed(input_ids, token_type_ids)
        attention = self.attention(hidden, attention_mask)
        logits, lte = [], []
        for index in range(self.num_layers):
            hidden = self.run_layer(index, hidden, attention)
            exit_input = hidden.detach() if detach_backbone else hidden
            layer_logits, layer_lte = self.exit_outputs(index, exit_input, attention_mask)
            logits.append(layer_logits)
            lte.append(layer_lte)
        return AllExits(
            logits=torch.stack(logits),
            lte=torch.stack(lte) if self.lte is not None else None,  # type: ignore[arg-type]
        )
