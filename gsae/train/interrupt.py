"""Ctrl-C held to step boundaries, so that a checkpoint never holds half a step.

Inside :meth:`StepGuard.step` a first SIGINT is remembered and raised as ``KeyboardInterrupt``
when the step is done (every group updated, the token count and data position moved on); a
second one raises at once and marks the guard ``broken``: the caller must then not save what is
in memory (the last checkpoint stays). Outside a step (waiting for data, in the model forward)
SIGINT raises at once, as usual: nothing has changed there yet.

With several processes (``deferred=True``) a first SIGINT is only remembered, wherever it
lands: the training loop says so in the next step's collective and every process stops after
that same step (torchrun passes a Ctrl-C on to every process, each at its own moment). A second
one still raises at once.

Signal handlers can only be set from the main thread; elsewhere the guard does nothing.
"""

from __future__ import annotations

import signal
import sys
import threading


class StepGuard:
    def __init__(self, deferred: bool = False):
        self.deferred = deferred  # remember a first Ctrl-C anywhere; the caller raises
        self.in_step = False
        self.pending = False  # a Ctrl-C arrived inside the current step
        self.broken = False  # a second one stopped a step half-way
        self.lost = False  # a KeyboardInterrupt died in a finalizer: the next step raises it
        self._previous = None
        self._previous_hook = None
        self._installed = False

    def __enter__(self) -> StepGuard:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._previous_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            sys.unraisablehook = self._previous_hook
            self._installed = False

    def _unraisable(self, info) -> None:
        # Python drops an exception raised in a finalizer (a generator closed by the garbage
        # collector, a __del__) and reports it here: a Ctrl-C whose handler ran there would be
        # lost, so it is noted and the next step raises it before changing anything
        if info.exc_type is not None and issubclass(info.exc_type, KeyboardInterrupt):
            self.lost = True
        self._previous_hook(info)

    def _handle(self, signum, frame) -> None:
        # no printing here: the signal may land inside another write to the same stream
        if not self.in_step and not self.deferred:
            raise KeyboardInterrupt
        if self.pending:
            self.broken = True
            raise KeyboardInterrupt
        self.pending = True

    def step(self) -> _Step:
        """``with guard.step(): ...``: the block runs to its end before a Ctrl-C is raised."""
        return _Step(self)


class _Step:
    __slots__ = ("guard",)

    def __init__(self, guard: StepGuard):
        self.guard = guard

    def __enter__(self) -> None:
        if self.guard.lost:
            self.guard.lost = False
            raise KeyboardInterrupt
        self.guard.in_step = True

    def __exit__(self, exc_type, exc, tb) -> None:
        guard = self.guard
        guard.in_step = False
        if guard.pending and exc_type is None and not guard.deferred:
            guard.pending = False
            raise KeyboardInterrupt
