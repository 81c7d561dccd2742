"""Every documented failure, as an operator meets it: the real ``wsiflow`` command in a
subprocess, its exact exit code (2: bad arguments or config, nothing started; 1: something
failed), one line naming the kind and the remedy, and no traceback.

README's "Errors" section lists these cases; each row there has a test here. The cases that
need no server and take a few seconds are in the fast set.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models import Registry
from pipeline import AnalysisParams, EngineSettings, GridSettings, ModelInfo, ResultFolder, RunSettings, analyse_slide
from privacy import audit_event, audit_log_path
from tests._models import add_tiny_model, tiny_manifest
from tests._synthetic import BACKGROUND, TISSUE, write_pyramid_tiff

ROOT = Path(__file__).resolve().parents[1]


def _closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "WSIFLOW_CONFIG")}
    return {**env, **extra}


def _run(cli: list[str], *args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cli, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env=env if env is not None else _env())


def _one_error(result: subprocess.CompletedProcess[str], kind: str, code: int, *, prefix: str = "wsiflow: error",
               private: Path | None = None) -> str:
    """The one line ``result`` printed: exit ``code``, ``prefix kind: message -- remedy``, no traceback,
    never the private path."""
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith(f"{prefix} {kind}: "), line
    assert " -- " in line.split(f"{kind}: ", 1)[1], f"no remedy: {line}"
    assert result.stderr.strip() == line, result.stderr
    if private is not None:
        assert str(private) not in line and private.name not in line, line
    return line


@pytest.fixture
def slide(tmp_path: Path) -> Path:
    """A file that stands for a slide: the failures below happen before any slide is read."""
    path = tmp_path / "case-4711.svs"
    path.write_bytes(b"never opened")
    return path


@pytest.fixture
def tiny_site(tmp_path: Path) -> tuple[Path, Path]:
    """A site registry with the tiny model, and a config making it the default."""
    root = tmp_path / "site-models"
    add_tiny_model(Registry(site_root=root))
    config = tmp_path / "site.yaml"
    config.write_text(f"models: {{registry_dir: {root}, default: tiny}}\n")
    return root, config


# --- arguments and config: exit 2 before anything starts ----------------------------------

def test_a_missing_slide_is_refused_before_anything_starts(wsiflow_cli, slide, tmp_path):
    missing = tmp_path / "patient-smith.svs"
    line = _one_error(_run(wsiflow_cli, "run", slide, missing, "--out", tmp_path / "o"), "config", 2,
                      private=missing)
    assert "slide argument 2 of 2 does not exist" in line
    broken = tmp_path / "patient-jones.svs"
    broken.symlink_to(tmp_path / "gone.svs")
    line = _one_error(_run(wsiflow_cli, "batch", broken, "--out", tmp_path / "o"), "config", 2, private=broken)
    assert "is a broken link" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_out_that_is_a_file_or_under_one(wsiflow_cli, slide, tmp_path, where):
    existing = tmp_path / "results.txt"
    existing.write_text("x")
    out = existing if where == "a file" else existing / "sub"
    line = _one_error(_run(wsiflow_cli, "run", slide, "--out", out), "config", 2)
    assert "--out" in line and where in line


def test_dask_address_closed_or_not_a_url(wsiflow_cli, slide, tmp_path):
    closed = f"tcp://127.0.0.1:{_closed_port()}"
    line = _one_error(_run(wsiflow_cli, "run", slide, "--out", tmp_path / "o", "--dask-address", closed), "config", 2)
    assert f"no Dask scheduler answers at {closed}" in line
    line = _one_error(_run(wsiflow_cli, "run", slide, "--out", tmp_path / "o", "--dask-address", "localhost:8786"),
                      "config", 2)
    assert "not a scheduler URL" in line and "tcp://HOST:PORT" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("option", ["--chunk-cells", "--stride", "--batch-size"])
def test_a_zero_count_is_refused(wsiflow_cli, slide, tmp_path, option):
    line = _one_error(_run(wsiflow_cli, "run", slide, "--out", tmp_path / "o", option, "0"), "config", 2)
    assert option in line and "must be at least 1" in line and "--help" in line


@pytest.mark.parametrize(("content", "match"), [
    (None, "is a folder"),
    (bytes(range(256)), "not text"),
    ('tissue: {min_optical_density: "x"}\n', "tissue.min_optical_density = 'x' must be a number"),
    ('models: {acceptance: {min_balanced_accuracy: "high"}}\n', "min_balanced_accuracy = 'high' must be a number"),
    ("dask: {address: not a url}\n", "dask.address 'not a url' is not a scheduler URL"),
    ("grid: {stride_px: 0}\n", "stride_px"),
    ("tissue: [1, 2\n", "not valid YAML"),
    ("tisue: {}\n", "unknown key(s) tisue"),
], ids=["folder", "binary", "wrong-type", "acceptance-type", "dask-address", "zero-stride", "yaml", "unknown-key"])
def test_a_bad_config_is_refused_at_load(wsiflow_cli, slide, tmp_path, content, match):
    config = tmp_path / "site.yaml"
    if content is None:
        config.mkdir()
    elif isinstance(content, bytes):
        config.write_bytes(content)
    else:
        config.write_text(content)
    line = _one_error(_run(wsiflow_cli, "--config", config, "run", slide, "--out", tmp_path / "o"), "config", 2)
    assert match in line
    # At load: any command refuses it, even one that does not use the bad key.
    _one_error(_run(wsiflow_cli, "--config", config, "models", "list"), "config", 2)


def _gpu_usable() -> bool:
    from flows.cli._options import _GPU_DRIVER_NODES

    if not any(os.path.exists(node) for node in _GPU_DRIVER_NODES):
        return False
    import torch

    return torch.cuda.is_available()


def test_device_cuda_without_a_gpu(wsiflow_cli, slide, tmp_path):
    if _gpu_usable():
        pytest.skip("this machine has a usable GPU")
    line = _one_error(_run(wsiflow_cli, "run", slide, "--out", tmp_path / "o", "--device", "cuda"), "config", 2)
    assert "device cuda" in line and "--device cpu" in line
    config = tmp_path / "gpu.yaml"
    config.write_text("engine: {device: cuda}\n")
    _one_error(_run(wsiflow_cli, "--config", config, "run", slide, "--out", tmp_path / "o"), "config", 2)
    # Chunks on a Dask cluster run on its workers' GPUs: not refused for this machine's lack of one.
    on_cluster = _run(wsiflow_cli, "run", slide, "--out", tmp_path / "o", "--device", "cuda",
                      "--dask-address", f"tcp://127.0.0.1:{_closed_port()}")
    assert "no Dask scheduler answers" in on_cluster.stderr


@pytest.mark.parametrize("command", ["run", "batch"])
def test_an_unreachable_prefect_api(wsiflow_cli, slide, tmp_path, command):
    url = f"http://127.0.0.1:{_closed_port()}/api"
    env = _env(PREFECT_API_URL=url)
    line = _one_error(_run(wsiflow_cli, command, slide, "--out", tmp_path / "o", env=env), "config", 2)
    assert f"no Prefect server answers at PREFECT_API_URL {url}" in line and "wsiflow server" in line
    if command == "run":  # --in-process never talks to the server: the next check (slides) speaks
        stayed = _run(wsiflow_cli, "run", tmp_path / "gone.svs", "--out", tmp_path / "o", "--in-process", env=env)
        assert "the slide argument does not exist" in _one_error(stayed, "config", 2)


def test_serve_without_a_server_or_an_inbox_folder(wsiflow_cli, slide, tmp_path):
    """`serve` needs a Prefect server and an existing inbox folder: both refused at once."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    line = _one_error(_run(wsiflow_cli, "serve", "--inbox", inbox, "--out", tmp_path / "o",
                           env=_env(PREFECT_HOME=str(tmp_path / "prefect-home"))), "config", 2)
    assert "PREFECT_API_URL" in line and "wsiflow server" in line
    url = f"http://127.0.0.1:{_closed_port()}/api"
    unreachable = _run(wsiflow_cli, "serve", "--inbox", inbox, "--out", tmp_path / "o", env=_env(PREFECT_API_URL=url))
    assert "no Prefect server answers" in _one_error(unreachable, "config", 2)
    missing = _run(wsiflow_cli, "serve", "--inbox", tmp_path / "case-4711", "--out", tmp_path / "o",
                   env=_env(PREFECT_API_URL=url))
    _one_error(missing, "config", 2, private=tmp_path / "case-4711")


# --- models: refused weights, exit 1 ------------------------------------------------------

@pytest.fixture
def bare_manifest(tmp_path: Path) -> Path:
    data = tiny_manifest().to_json()
    data.pop("weights", None)
    data.pop("version", None)
    data["name"] = "imported"
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(data))
    return path


def _torchscript(path: Path) -> Path:
    import torch

    torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)), str(path))
    return path


@pytest.mark.parametrize("kind", ["pickle", "torch.save", "torchscript", "device", "fifo"])
def test_models_import_refuses_what_is_not_safetensors(wsiflow_cli, tmp_path, bare_manifest, kind):
    import torch

    source = tmp_path / "weights.safetensors"
    if kind == "pickle":
        source.write_bytes(pickle.dumps({"classifier.weight": [0.0] * 4}))
    elif kind == "torch.save":
        torch.save({"w": torch.zeros(2)}, source)
    elif kind == "torchscript":
        _torchscript(source)
    elif kind == "device":
        source.symlink_to("/dev/zero")
    else:
        os.mkfifo(source)  # opening it for reading would wait for a writer forever
    env = _env(WSIFLOW_MODELS_DIR=str(tmp_path / "site-models"), WSIFLOW_HOME=str(tmp_path / "home"))
    line = _one_error(_run(wsiflow_cli, "models", "import", source, "--manifest", bare_manifest, env=env),
                      "unsafe-weights", 1)
    expected = {"pickle": "a Python pickle", "torch.save": "a zip archive", "torchscript": "a zip archive",
                "device": "not a regular file", "fifo": "not a regular file"}[kind]
    assert expected in line
    assert not (tmp_path / "site-models" / "imported").exists()


def test_weights_linked_to_dev_zero_fail_verify_and_run_without_reading_forever(wsiflow_cli, tiny_site, slide,
                                                                                 tmp_path):
    root, config = tiny_site
    weights = root / "tiny" / "1" / "weights.safetensors"
    weights.unlink()
    weights.symlink_to("/dev/zero")
    env = _env(WSIFLOW_HOME=str(tmp_path / "home"))
    verify = _run(wsiflow_cli, "--config", config, "models", "verify", "tiny", env=env)
    line = _one_error(verify, "weights-tampered", 1, prefix="tiny@1: error")
    assert "not a regular file" in line
    run = _run(wsiflow_cli, "--config", config, "run", slide, "--out", tmp_path / "o", env=env)
    assert "not a regular file" in _one_error(run, "weights-tampered", 1)


# --- results and the audit log: damaged files, exit 1 -------------------------------------

@pytest.fixture(scope="module")
def result_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete result of the tiny model on a small generated slide (in this process: seconds)."""
    root = tmp_path_factory.mktemp("result")
    registry = Registry(site_root=root / "models")
    add_tiny_model(registry)
    model = registry.load("tiny")
    m = model.manifest
    info = ModelInfo(m.name, m.version, m.weights_sha256, tuple(c.color for c in m.classes))
    image = np.full((1024, 1024, 3), BACKGROUND, np.uint8)
    image[256:768, 256:768] = TISSUE
    slide = write_pyramid_tiff(root / "slide.tiff", image, 2.0)
    settings = RunSettings(out_dir=root / "out", model="tiny", analysis=AnalysisParams(grid=GridSettings()),
                           engine=EngineSettings(batch_size=16, device="cpu"))
    outcome = analyse_slide(slide, model, info, settings, secret=b"s" * 32)
    assert outcome.result_dir is not None, outcome
    return Path(outcome.result_dir)


@pytest.mark.parametrize("review", [
    '{"type": "FeatureCollection", "features": [',
    '["not", "a", "collection"]',
    '{"type": "FeatureCollection", "features": [42]}',
    b"\xff\xfe\x00binary",
], ids=["truncated", "a-list", "bad-feature", "binary"])
def test_export_with_a_damaged_review(wsiflow_cli, result_dir, tmp_path, review):
    folder = ResultFolder(result_dir)
    env = _env(WSIFLOW_HOME=str(tmp_path / "home"))
    try:
        if isinstance(review, bytes):
            folder.review.write_bytes(review)
        else:
            folder.review.write_text(review)
        line = _one_error(_run(wsiflow_cli, "export", result_dir, "--out", tmp_path / "x", env=env),
                          "not-a-result", 1)
        assert "review (review.geojson) is damaged" in line and "wsiflow view" in line
        assert not (tmp_path / "x").exists()  # refused before anything was written
    finally:
        folder.review.unlink()
    exported = _run(wsiflow_cli, "export", result_dir, "--out", tmp_path / "x", env=env)
    assert exported.returncode == 0, exported.stderr  # without the review, the export works


def test_audit_show_on_a_garbled_line(wsiflow_cli, tmp_path):
    home = tmp_path / "home"
    for _ in range(3):
        audit_event("view", slide_id="s-1", directory=home)
    path = audit_log_path(home)
    lines = path.read_text().splitlines()
    lines[1] = lines[1][: len(lines[1]) // 2]  # a line cut in the middle
    path.write_text("\n".join(lines) + "\n")
    env = _env(WSIFLOW_HOME=str(home))
    line = _one_error(_run(wsiflow_cli, "audit", "show", env=env), "audit-damaged", 1)
    assert "line 2 " in line and "wsiflow audit verify" in line
    verify = _run(wsiflow_cli, "audit", "verify", env=env)
    assert verify.returncode == 1 and "Traceback" not in verify.stderr and "line 2" in verify.stdout
    # Appending goes on from the head (the last line is intact); show still names line 2.
    audit_event("view", slide_id="s-2", directory=home)
    assert "line 2 " in _one_error(_run(wsiflow_cli, "audit", "show", env=env), "audit-damaged", 1)


def test_train_with_a_missing_annotation_file(wsiflow_cli, tiny_site, slide, tmp_path):
    _, config = tiny_site
    result = _run(wsiflow_cli, "--config", config, "train", "--slides", slide, "--annotations",
                  tmp_path / "patient-smith.geojson", "--name", "mine")
    line = _one_error(result, "bad-training-data", 1, private=tmp_path / "patient-smith.geojson")
    assert "annotation file(s) 1 of 1 do not exist" in line


def test_make_model_without_training_data(tmp_path):
    empty = tmp_path / "data"
    empty.mkdir()
    result = subprocess.run([sys.executable, "-m", "models.train_tissue_qc", "--data", str(empty), "--out",
                             str(tmp_path / "model")], capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env=_env())
    line = _one_error(result, "bad-training-data", 2)
    assert "training sources are missing" in line and "--data" in line
    assert not (tmp_path / "model").exists()


# --- a slide folder with broken links: reported per slide, the others run -----------------

@pytest.mark.slow
def test_broken_links_in_a_slide_folder_fail_alone(wsiflow_cli, tiny_site, tmp_path):
    _, config = tiny_site
    folder = tmp_path / "scans"
    folder.mkdir()
    image = np.full((512, 512, 3), BACKGROUND, np.uint8)
    image[128:384, 128:384] = TISSUE
    write_pyramid_tiff(folder / "a-good.tiff", image, 2.0)
    (folder / "b-broken.svs").symlink_to(tmp_path / "moved-away.svs")
    (folder / "c-loop.svs").symlink_to(folder / "c-loop.svs")
    (folder / "notes.txt").symlink_to(tmp_path / "no-notes.txt")  # not a slide: not reported
    result = _run(wsiflow_cli, "--config", config, "run", folder, "--out", tmp_path / "o", "--no-isolate", "--json")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    rows = json.loads(result.stdout)["slides"]
    assert [r["status"] for r in rows] == ["done", "failed", "failed"]
    assert [r["error"]["kind"] for r in rows[1:]] == ["not-found", "not-found"]
    failed_lines = [line for line in result.stderr.splitlines() if "failed" in line]
    assert len(failed_lines) == 2 and all("not-found" in line for line in failed_lines), result.stderr
    assert "b-broken" not in result.stderr + result.stdout and "c-loop" not in result.stderr + result.stdout
