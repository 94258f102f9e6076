"""The names the README documents under ``gsae.activations``; they live in :mod:`gsae.hf`
(models, text sources, the token stream, hooks)."""

from .hf.hooks import lm_logits, record, splice
from .hf.models import load_model

__all__ = ["lm_logits", "load_model", "record", "splice"]
