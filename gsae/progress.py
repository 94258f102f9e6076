"""Progress bars (tqdm's: a text bar in a terminal, a widget in a notebook)."""

from __future__ import annotations


def progress_bar(total: int, desc: str, unit: str = "tok"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True)
