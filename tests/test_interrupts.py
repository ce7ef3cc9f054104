"""Tests of nanlab.interrupts: the first signal is a flag, the second aborts, handlers come back."""

import os
import signal

import pytest

from nanlab.interrupts import EXIT_CODES, StopOnSignal


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_first_signal_sets_the_flag_second_aborts(signum, code, capsys):
    before = signal.getsignal(signum)
    with StopOnSignal() as stop:
        assert not stop.requested and stop.exit_code == 0
        os.kill(os.getpid(), signum)  # delivered to the main thread before kill returns to Python code
        assert stop.requested and stop.signum == signum and stop.exit_code == code == EXIT_CODES[signum]
        assert stop.name == signal.Signals(signum).name
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signum) is before
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "Ctrl-C again to abort" in err  # one line (after a newline)


def test_handlers_are_restored_after_an_error():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(RuntimeError):
        with StopOnSignal(message=""):
            raise RuntimeError("boom")
    assert signal.getsignal(signal.SIGINT) is before
