"""``ResultFolder``: finding a result from what a user types, through ``latest`` and old layouts."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from pipeline import (
    LATEST_LINK,
    ModelInfo,
    MppPolicy,
    MppOverride,
    NotAResultError,
    ResultFolder,
    ResultManifest,
    WorkerError,
    resolve_mpp,
)

MODEL = ModelInfo("tissue-qc", 1, "0" * 64, ("#000000",))


def _complete(folder: ResultFolder, sid: str = "s-1") -> ResultFolder:
    folder.heatmap.mkdir(parents=True)
    folder.write_manifest(ResultManifest(key="k" + folder.path.name, slide_id=sid, model=MODEL.ref))
    return folder


def test_layout_is_slide_model_version_digest(tmp_path):
    folder = ResultFolder.for_run(tmp_path, "s-1", MODEL, "ab" * 32)
    assert folder.path == tmp_path / "s-1" / "tissue-qc" / "v1-abababababab"


def test_find_resolves_latest_so_a_later_run_cannot_move_what_a_caller_holds(tmp_path):
    first = _complete(ResultFolder.for_run(tmp_path, "s-1", MODEL, "a" * 64))
    first.mark_latest()
    held = ResultFolder.find(tmp_path / "s-1" / "tissue-qc")
    assert held is not None and held.path == first.path.resolve()
    second = _complete(ResultFolder.for_run(tmp_path, "s-1", MODEL, "b" * 64))
    second.mark_latest()
    assert held.path == first.path.resolve()  # unchanged
    assert ResultFolder.find(tmp_path / "s-1" / "tissue-qc" / LATEST_LINK).path == second.path.resolve()
    assert ResultFolder.find(tmp_path / "s-1").path == second.path.resolve()  # the slide's one model
    assert ResultFolder.latest(tmp_path, "s-1", "tissue-qc").path.resolve() == second.path.resolve()


def test_find_falls_back_to_the_newest_complete_result_when_latest_dangles(tmp_path):
    first = _complete(ResultFolder.for_run(tmp_path, "s-1", MODEL, "a" * 64))
    time.sleep(0.01)
    second = _complete(ResultFolder.for_run(tmp_path, "s-1", MODEL, "b" * 64))
    os.symlink("v1-gone", tmp_path / "s-1" / "tissue-qc" / LATEST_LINK)
    assert ResultFolder.find(tmp_path / "s-1" / "tissue-qc").path == second.path
    assert first.is_complete()


def test_an_old_layout_result_does_not_hide_newer_ones(tmp_path):
    model_dir = tmp_path / "s-1" / "tissue-qc"
    _complete(ResultFolder(model_dir))  # a result written straight into the model folder
    assert ResultFolder.find(model_dir).path == model_dir.resolve()
    newer = _complete(ResultFolder.for_run(tmp_path, "s-1", MODEL, "c" * 64))
    newer.mark_latest()
    assert ResultFolder.find(model_dir).path == newer.path.resolve()


def test_two_models_on_a_slide_are_ambiguous_and_junk_is_no_result(tmp_path):
    _complete(ResultFolder.for_run(tmp_path, "s-1", MODEL, "a" * 64)).mark_latest()
    _complete(ResultFolder.for_run(tmp_path, "s-1", ModelInfo("other", 2, "1" * 64, ()), "a" * 64)).mark_latest()
    assert ResultFolder.find(tmp_path / "s-1") is None
    assert ResultFolder.find(tmp_path / "s-1" / "other").path.name == "v2-aaaaaaaaaaaa"
    assert ResultFolder.find(tmp_path / "nothing") is None
    (tmp_path / "junk").mkdir()
    assert ResultFolder.find(tmp_path / "junk") is None


def test_typed_readers_refuse_a_broken_summary(tmp_path):
    folder = _complete(ResultFolder.for_run(tmp_path, "s-1", MODEL, "a" * 64))
    with pytest.raises(NotAResultError, match="summary.json"):
        folder.read_summary()
    folder.summary_path.write_text(json.dumps({"slide_id": "s-1", "tiles": 3}))
    with pytest.raises(NotAResultError, match="incomplete"):
        folder.read_summary()
    assert folder.read_manifest().model == "tissue-qc@1" and folder.is_complete("kv1-aaaaaaaaaaaa")
    assert not folder.is_complete("another key")


def test_a_forced_config_entry_names_the_declined_cli_value():
    policy = MppPolicy(cli_mpp=(0.3, 0.3), overrides=(MppOverride(0.5, 0.5, "x", vendor="aperio", force=True),))
    r = resolve_mpp((0.25, 0.25), slide_path=Path("s.svs"), vendor="aperio", objective_power=None, policy=policy)
    assert (r.mpp_x, r.source, r.override, r.declined) == (0.5, "config", "mpp_overrides[x]", "--mpp")


def test_a_crashed_slide_is_not_retried_but_a_lost_worker_is():
    assert WorkerError("lost").transient
    assert not WorkerError("the process died", transient=False).transient
