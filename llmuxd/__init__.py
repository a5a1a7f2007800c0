"""llmuxd: one GPU box, many vLLM models, one resident at a time."""

__version__ = "0.1.0"
