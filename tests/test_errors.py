"""The one error rule (vae_pipeline.errors): every error class of the pipeline is a UserError
(never retried, one line) or a TransientError (retried, one line); anything else is a bug whose
traceback the CLI shows."""

from __future__ import annotations

import importlib
import inspect

import pytest

from flows.retrain import is_transient
from vae_pipeline import cli
from vae_pipeline.data.errors import DataError, SourceUnreachable
from vae_pipeline.errors import PipelineError, TransientError, UserError, is_permanent
from vae_pipeline.tracking import TrackingAuthError, TrackingUnavailable

from .test_layers import SOURCES, module_name


def _error_classes() -> list[type]:
    found = {}
    for path in SOURCES:
        if path.stem == "__main__":  # runs the CLI when imported
            continue
        module = importlib.import_module(module_name(path))
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                found[obj.__qualname__] = obj
    return list(found.values())


def test_every_error_class_of_the_pipeline_has_a_kind():
    classes = _error_classes()
    assert len(classes) >= 16  # the classes of the data, training, registry, flows, ...
    without = [c.__name__ for c in classes if not issubclass(c, PipelineError)]
    assert not without, f"not a PipelineError: {without}"
    kindless = [
        c.__name__
        for c in classes
        if not issubclass(c, UserError | TransientError)
        and c not in (PipelineError, UserError, TransientError)
        and c.__name__ != "RetrainFailed"  # the flow's summary of a failed step
    ]
    assert not kindless, f"neither a UserError nor a TransientError: {kindless}"


def test_retry_rule():
    assert is_permanent(DataError("bad folder")) and is_permanent(TrackingAuthError("refused"))
    assert not is_permanent(SourceUnreachable("no answer"))  # a data error worth a retry
    assert not is_permanent(TrackingUnavailable("down"))
    assert not is_permanent(KeyError("a bug"))  # unknown: the network steps retry it

    class State:
        def __init__(self, exc):
            self.exc = exc

        def result(self, raise_on_failure=False):
            return self.exc

    assert is_transient(None, None, State(TransientError("x")))
    assert not is_transient(None, None, State(UserError("x")))


def test_the_cli_prints_pipeline_errors_in_one_line_and_shows_bugs(monkeypatch, capsys):
    def bad_input(cfg, args):
        raise UserError("data.source 'x' does not exist: point it at a folder")

    def bug(cfg, args):
        raise RuntimeError("an internal bug")

    monkeypatch.setitem(cli.COMMANDS, "prepare", bad_input)
    assert cli.main(["prepare"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "vae-pipeline prepare: error: data.source 'x' does not exist: point it at a folder"
    ]
    monkeypatch.setitem(cli.COMMANDS, "prepare", bug)
    with pytest.raises(RuntimeError, match="an internal bug"):  # the traceback is shown
        cli.main(["prepare"])
