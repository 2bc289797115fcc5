"""Settings: a name that is not a setting is refused with the one it probably meant (never ignored),
an empty API key is refused, and every problem is one line."""

from __future__ import annotations

import pytest

from exitserve.cli import main
from exitserve.server.settings import SettingsError, settings_from


@pytest.mark.parametrize(("overrides", "message"), [
    ({"apikey": "x"}, "unknown setting 'apikey'; did you mean api_key?"),  # was ignored: served without the key
    ({"max_batch": "8"}, "unknown setting 'max_batch'; did you mean max_batch_size?"),
    ({"api_key": ""}, "setting api_key: an empty API key would let anyone in"),
    ({"api_key": "  "}, "setting api_key: an empty API key would let anyone in"),
    ({"max_batch_size": "0"}, "setting max_batch_size: Input should be greater than or equal to 1 (got '0')"),
    ({"backend": "tensorrt"}, "setting unknown backend 'tensorrt' (expected 'onnxruntime' or 'torch')"),
    ({"target_agreement": "0.9", "audit_rate": "0"}, "target_agreement needs audits: set audit_rate above 0"),
])
def test_a_bad_setting_is_refused_in_one_line(overrides, message):
    with pytest.raises(SettingsError) as err:
        settings_from(overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_an_unknown_exitserve_variable_is_refused_not_ignored(monkeypatch):
    monkeypatch.setenv("EXITSERVE_APIKEY", "s3cret")  # used to start a server with no key, silently
    with pytest.raises(SettingsError, match=r"^unknown setting EXITSERVE_APIKEY in the environment; did you mean "
                                            r"EXITSERVE_API_KEY\?$"):
        settings_from({})


def test_the_variables_other_parts_read_are_not_settings_and_not_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("EXITSERVE_CACHE", str(tmp_path))
    monkeypatch.setenv("EXITSERVE_API_KEY", "s3cret")
    assert settings_from({}).api_key == "s3cret"


@pytest.mark.parametrize(("argv", "message"), [
    (["--set", "apikey=x"], "unknown setting 'apikey'; did you mean api_key?"),
    (["--set", "max_batch_size=0"], "setting max_batch_size: Input should be greater than or equal to 1"),
    (["--set", "max_batch_size"], "--set takes NAME=VALUE (got 'max_batch_size')"),
])
def test_serve_says_what_is_wrong_with_a_setting_in_one_line(argv, message, capsys):
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"exitserve serve: error: {message}"), err


@pytest.mark.parametrize(("setting", "allocator", "arena"), [
    ("auto", "jemalloc", False), ("auto", None, True), ("true", "jemalloc", True), ("false", None, False),
])
def test_the_ort_arena_follows_the_allocator_unless_set(setting, allocator, arena, monkeypatch):
    """jemalloc returns freed pages, so the arena only keeps memory (RSS ~2x); the system malloc
    fragments without it (docs/RESULTS.md, memory)."""
    from exitserve.server import allocator as allocator_module

    monkeypatch.setattr(allocator_module, "loaded", lambda: allocator)
    assert settings_from({"ort_arena": setting}).arena is arena
