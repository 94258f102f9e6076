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


class StageBars:
    """One bar per stage of a pipeline that reports ``(stage, done, total)``, opened at its
    first report (the requests of gsae-autointerp's explain and score stages)."""

    def __init__(self, unit: str = "req"):
        self.unit, self.bars = unit, {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.bars:
            self.bars[stage] = progress_bar(total, stage, self.unit)
        self.bars[stage].update(done - self.bars[stage].n)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
