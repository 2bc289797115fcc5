"""The names of the fine-tuning recipes (models/strategies.py implements them), importable without torch:
the CLI offers them as choices, and `exitserve serve` never imports torch on ONNX Runtime."""

STRATEGIES = ("alternating", "alternating-epoch", "joint", "two-stage", "weighted", "self-distill", "raw")
DEFAULT_STRATEGY = "two-stage"
LTE_TARGETS = ("label", "final")
