"""Progress bars and quiet mode (sparsenn.core.progress, the trainer's progress hook)."""

import pytest
import torch

from sparsenn.core import progress as pg
from sparsenn.train.loop import train
from conftest import TinyMLP, make_batches


@pytest.fixture(autouse=True)
def _follow_environment(monkeypatch):
    monkeypatch.delenv("SPARSENN_QUIET", raising=False)
    pg.set_quiet(None)
    yield
    pg.set_quiet(None)


def test_quiet_from_environment_and_override(monkeypatch):
    assert not pg.is_quiet()
    for value in ("1", "true", "YES", "on"):
        monkeypatch.setenv("SPARSENN_QUIET", value)
        assert pg.is_quiet()
    monkeypatch.setenv("SPARSENN_QUIET", "0")
    assert not pg.is_quiet()
    pg.set_quiet(True)
    assert pg.is_quiet()
    monkeypatch.setenv("SPARSENN_QUIET", "1")
    pg.set_quiet(False)
    assert not pg.is_quiet()
    with pytest.raises(TypeError, match="quiet must be True, False or None, got 'yes'"):
        pg.set_quiet("yes")


def test_progress_yields_everything_and_draws_on_stderr(capsys):
    assert list(pg.progress(range(5), "count")) == [0, 1, 2, 3, 4]
    captured = capsys.readouterr()
    assert captured.out == "" and "count" in captured.err
    assert list(pg.progress(iter("abc"))) == ["a", "b", "c"]  # no len(): no total


def test_quiet_and_disabled_bars_draw_nothing(capsys, monkeypatch):
    monkeypatch.setenv("SPARSENN_QUIET", "1")
    assert list(pg.progress(range(3), "count")) == [0, 1, 2]
    with pg.Bar(3, "x") as bar:
        assert not bar.active
        bar.update()
        bar.set_postfix(loss=1.0)
    monkeypatch.delenv("SPARSENN_QUIET")
    assert not pg.Bar(3, "x", enabled=False).active
    assert capsys.readouterr().err == ""


def test_trainer_progress_is_off_by_default_and_on_when_asked(capsys, monkeypatch):
    torch.manual_seed(0)
    model, data = TinyMLP(), make_batches(n=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train(model, data, opt, epochs=2)
    assert capsys.readouterr().err == ""
    losses = train(model, data, opt, epochs=2, progress="fit")
    err = capsys.readouterr().err
    assert "fit" in err and "6/6" in err and "epoch=2/2" in err and len(losses) == 2
    monkeypatch.setenv("SPARSENN_QUIET", "1")
    train(model, data, opt, epochs=1, progress=True)
    assert capsys.readouterr().err == ""
