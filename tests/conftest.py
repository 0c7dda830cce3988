"""What several test files share."""
import contextlib
import os

# One CPU thread for every run of the suite (utils.default_threads reads it; subprocesses inherit it):
# the tiny networks gain nothing from more, and the suite's time must not depend on the machine's load.
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402

import utils  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped with the reason elsewhere; "
                                       "python -m pytest -m cuda runs only these)")


@contextlib.contextmanager
def _interrupted_after(epoch=1):
    """``with interrupted_after(1): main(...)``: the run stops as Ctrl-C would, right after epoch
    ``epoch`` is recorded (its last.pt written), and the block expects that KeyboardInterrupt."""
    original = utils.Run.end_epoch

    def end_epoch(self, metrics, extra=None):
        row = original(self, metrics, extra)
        if self.epoch == epoch:
            raise KeyboardInterrupt
        return row
    utils.Run.end_epoch = end_epoch
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        utils.Run.end_epoch = original


@pytest.fixture
def interrupted_after():
    """The context manager :func:`_interrupted_after` (a run interrupted after an epoch, to test resume)."""
    return _interrupted_after


@pytest.fixture
def cli(capsys):
    """``cli(main, *argv)``: a script's ``main`` run under ``utils.main_guard`` in this process, as its
    ``__main__`` runs it; returns (exit status, the non-empty stderr lines)."""
    def run(main, *argv):
        with pytest.raises(SystemExit) as stop:
            utils.main_guard(lambda: main(list(argv)))
        return stop.value.code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return run


@pytest.fixture
def loaded_teacher(monkeypatch):
    """A dict that gets ``"teacher"``: the network ``train_kd.load_teacher`` returns during the test."""
    import train_kd
    captured, load_teacher = {}, train_kd.load_teacher

    def capture(*args, **kwargs):
        captured["teacher"] = load_teacher(*args, **kwargs)
        return captured["teacher"]
    monkeypatch.setattr(train_kd, "load_teacher", capture)
    return captured
