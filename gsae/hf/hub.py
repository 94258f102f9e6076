"""Names of models and data sets: the bundled demo, hub ids, whether the hub can be reached,
and one error message for what could not be loaded."""

from __future__ import annotations

import os
from pathlib import Path

PYTHIA_SIZES = ("14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")


def bundled_dir() -> Path:
    """Where the offline demo model and corpus live (see demo/README.md)."""
    return Path(__file__).resolve().parents[1] / "demo"


def hub_id(name: str) -> str:
    """``pythia-160m`` -> ``EleutherAI/pythia-160m`` (also ``-deduped``); other names as given."""
    base = name.lower()
    if base.startswith("pythia-") and base.removeprefix("pythia-").split("-")[0] in PYTHIA_SIZES:
        return f"EleutherAI/{base}"
    return name


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub can be reached (skipped when HF_HUB_OFFLINE is set), checked
    once so that an offline machine fails in seconds rather than after minutes of retries.

    The question goes to ``HF_ENDPOINT`` (a mirror) through huggingface_hub's own HTTP client, so
    ``HTTPS_PROXY``/``HTTP_PROXY`` and any client factory the user set are honoured; any answer,
    even an error status, means the hub is there."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return False
    try:
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session
    except ImportError:
        return False
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    try:
        get_session().head(endpoint, timeout=timeout)
    except Exception:
        return False
    return True


def load_message(what: str, name: str, tried: list[str], flag: str) -> str:
    hints = {
        "model": "a local directory saved with save_pretrained",
        "dataset": "a local .txt/.jsonl/.parquet file or a saved datasets directory",
    }
    hint = hints[what]
    return f"could not load {what} {name!r}: " + "; ".join(tried) + f". Pass {hint} with {flag}."


def local_name(name: str) -> str:
    """A model or dataset name as a run records it: a local path made absolute (the run is then
    read the same from any directory), anything else (``demo``, a hub id) as given."""
    if name == "demo" or not Path(name).exists():
        return name
    return str(Path(name).resolve())
