"""`exitserve serve`'s checkpoints and names: refused before anything loads when they do not add up."""

from __future__ import annotations

import pytest

from exitserve.cli import _served, main


def test_checkpoints_and_names_become_the_models_setting(tmp_path):
    a, b = tmp_path / "x" / "sst2", tmp_path / "y" / "sst2"
    assert _served([], []) == {}
    assert _served([str(a)], []) == {"checkpoint": str(a)}
    assert _served([str(a)], ["sentiment"]) == {"models": {"sentiment": str(a)}}
    assert _served([str(a), str(tmp_path / "tox")], []) == {"models": {"sst2": str(a), "tox": str(tmp_path / "tox")}}
    assert _served([str(a), str(b)], ["one", "two"]) == {"models": {"one": str(a), "two": str(b)}}


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["x/sst2", "y/sst2"], "called the same"),
        (["a", "b", "--name", "one"], "1 --name for 2 checkpoints"),
        (["a", "b", "--name", "m", "--name", "m"], "called the same"),
        (["a", "b", "--ray"], "--ray serves one model"),
        (["a", "b", "--name", "a/b", "--name", "c"], "model name 'a/b'"),
    ],
)
def test_names_that_do_not_add_up_are_refused_before_loading(args, fragment, capsys):
    assert main(["serve", *args]) == 2
    assert fragment in capsys.readouterr().err
