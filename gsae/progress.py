"""Progress bars (tqdm's: a text bar in a terminal, a widget in a notebook)."""

from __future__ import annotations

_ENABLED = True


def set_progress(enabled: bool) -> None:
    """Show progress bars in this process or not (with several processes, only the first)."""
    global _ENABLED
    _ENABLED = bool(enabled)


def progress_bar(total: int, desc: str, unit: str = "tok"):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=True,
        dynamic_ncols=True,
        disable=not _ENABLED,
        # shown from its first progress on: a command that stops on bad input before any
        # work (its bar open, still at 0) prints its one-line error and nothing else
        delay=0.1,
    )
