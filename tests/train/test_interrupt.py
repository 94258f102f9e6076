"""The Ctrl-C guard of a training step: a Ctrl-C inside a step waits for its end, a second one
does not, one lost in a finalizer stops the next step, and off the main thread it does nothing."""

import signal
import sys
import threading

import pytest

from gsae.train.interrupt import StepGuard


def test_a_ctrl_c_inside_a_step_waits_for_its_end_and_a_second_one_does_not():
    guard = StepGuard()
    done = []
    with guard:
        with pytest.raises(KeyboardInterrupt):
            with guard.step():
                signal.raise_signal(signal.SIGINT)
                done.append("rest of the step")
        assert done == ["rest of the step"] and not guard.broken
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # between steps: at once
        with pytest.raises(KeyboardInterrupt):
            with guard.step():
                signal.raise_signal(signal.SIGINT)
                signal.raise_signal(signal.SIGINT)  # the second: at once, and the step is broken
                done.append("never")
        assert guard.broken and "never" not in done
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_ctrl_c_lost_in_a_finalizer_stops_the_next_step():
    """Between steps SIGINT raises at once; if that happens inside a finalizer (a generator
    closed by the garbage collector, as after ``next(model.parameters())``) Python drops the
    exception: the next step must raise it before it runs, not train on."""
    guard = StepGuard()
    done = []

    def params():
        try:
            yield 1
        finally:
            signal.raise_signal(signal.SIGINT)  # the handler runs during the close

    with guard:
        gen = params()
        next(gen)
        del gen  # closed by its finalizer: the KeyboardInterrupt is dropped there
        with pytest.raises(KeyboardInterrupt):
            with guard.step():
                done.append("step")
        assert done == []
        with guard.step():  # raised once: the following step runs
            done.append("next")
    assert done == ["next"] and sys.unraisablehook is not guard._unraisable


def test_the_guard_does_nothing_off_the_main_thread():
    errors = []

    def work():
        try:
            with StepGuard() as guard, guard.step():
                pass
        except Exception as err:
            errors.append(err)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert not errors
