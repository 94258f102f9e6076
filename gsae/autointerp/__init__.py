"""Auto-interpretability of trained SAEs against any OpenAI-compatible chat endpoint.

- :mod:`gsae.autointerp.prompts`: every prompt and how answers are read;
- :mod:`gsae.autointerp.client`: the concurrent, rate-limited, retrying, cached client;
- :mod:`gsae.autointerp.score`: examples from the browser's collection, explanation,
  detection and fuzzing, the paper's aggregation.
"""

from .client import AnswerCache, ChatClient, EndpointError
from .score import AutoInterpConfig, AutoInterpResult, run_autointerp, write_results

__all__ = [
    "AnswerCache",
    "AutoInterpConfig",
    "AutoInterpResult",
    "ChatClient",
    "EndpointError",
    "run_autointerp",
    "write_results",
]
