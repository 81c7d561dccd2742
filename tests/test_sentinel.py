"""No patient data in anything wsiflow writes.

A generated SVS-like slide carries a sentinel string in every text tag, every
ImageDescription field, its file name and its folder name, and shows it as text in the
pixels of its label and macro images. It goes through the whole pipeline: a CLI run, a
batch flow on the session's Prefect server and a review export. Then every byte written
(results, export, captured logs, the Prefect database and server log, the site's audit
log and other site files) is searched for the sentinel. Only the site's private index
files (owner-only; they map IDs back to paths by design) may hold it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline import site_dir
from privacy import audit_log_path, verify_audit_log
from tests._sentinel_slide import SENTINEL, write_sentinel_svs

# Site files that exist to map pseudonymous IDs back to paths; never part of results.
PRIVATE_SITE_FILES = ("slide-index.json", "batches/", "inboxes/")


def _variants(text: str) -> list[bytes]:
    forms = {text, text.lower(), text.upper()}
    out = []
    for form in forms:
        out += [form.encode("utf-8"), form.encode("utf-16-le"), form.encode("utf-16-be")]
    return out


def _decoded_views(path: Path, raw: bytes) -> list[bytes]:
    """Compressed containers whose text would not show in the raw bytes."""
    views = [raw]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        views.append(json.dumps(table.to_pylist(), default=str).encode())
        views.append(json.dumps({k.decode(errors="replace"): v.decode(errors="replace")
                                 for k, v in (table.schema.metadata or {}).items()}).encode())
    elif path.suffix == ".png":
        from PIL import Image

        with Image.open(path) as image:
            views.append(json.dumps({str(k): str(v) for k, v in image.info.items()}).encode())
    return views


def _hits(root: Path, skip: tuple[str, ...] = ()) -> list[str]:
    needles = _variants(SENTINEL)
    found = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if SENTINEL.lower() in relative.lower():
            found.append(f"{root.name}/{relative} (name)")
        if not path.is_file() or any(relative == s or relative.startswith(s) for s in skip):
            continue
        for view in _decoded_views(path, path.read_bytes()):
            if any(n in view for n in needles):
                found.append(f"{root.name}/{relative}")
                break
    return found


@pytest.mark.slow
def test_the_sentinel_appears_in_nothing_wsiflow_writes(prefect_server, wsiflow_cli, tmp_path):
    slide = write_sentinel_svs(tmp_path / "incoming", SENTINEL)
    assert SENTINEL in slide.name and SENTINEL in slide.parent.name
    assert SENTINEL.encode() in slide.read_bytes()  # the input really carries it
    logs = tmp_path / "logs"
    logs.mkdir()
    written = tmp_path / "written"  # everything wsiflow writes goes under here (or the site/Prefect dirs)
    env = {**os.environ, "PREFECT_API_URL": prefect_server["url"], "PREFECT_HOME": str(prefect_server["home"])}
    local_env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}

    def wsiflow(name: str, *args: str, environ: dict[str, str]) -> subprocess.CompletedProcess:
        done = subprocess.run([*wsiflow_cli, "--verbose", *args], capture_output=True, text=True,
                              timeout=900, env=environ)
        (logs / f"{name}.out").write_text(done.stdout, encoding="utf-8")
        (logs / f"{name}.err").write_text(done.stderr, encoding="utf-8")
        assert done.returncode == 0, f"wsiflow {name} failed:\n{done.stderr[-3000:]}"
        return done

    wsiflow("inspect", "inspect", str(slide), "--json", environ=local_env)
    run = wsiflow("run", "run", str(slide), "--out", str(written / "cli"), "--stride", "112", "--json",
                  environ=local_env)
    [row] = json.loads(run.stdout)["slides"]
    result_dir = Path(row["result_dir"])
    assert row["status"] == "done" and row["slide_id"].startswith("s-")

    batch = wsiflow("batch", "batch", str(slide), "--out", str(written / "flow"), "--stride", "112", "--json",
                    environ=env)
    report = json.loads(batch.stdout)
    assert [r["status"] for r in report["slides"]] == ["done"]
    assert report["slides"][0]["slide_id"] == row["slide_id"]  # same content, same pseudonym

    # A pathologist's review (headless: the widget's own save function), then an export.
    from viewer._review import ResultInfo, ReviewedShape, save_review

    info = ResultInfo.from_result(result_dir)
    triangle_um = np.array([[100.0, 100.0], [100.0, 400.0], [400.0, 400.0]])
    save_review(info, [ReviewedShape(triangle_um, info.class_names[-1], "confirm", "looks right")],
                reviewer="dr-review")
    wsiflow("export", "export", str(result_dir), "--out", str(written / "export"), environ=local_env)
    wsiflow("audit", "audit", "verify", environ=local_env)

    assert list((written / "export").glob("s-*/review.geojson")), "the export wrote no review"
    audit = [json.loads(line) for line in audit_log_path().read_text(encoding="utf-8").splitlines()]
    mine = {e["action"] for e in audit if e["slide_id"] == row["slide_id"]}
    assert {"run", "review-save", "export"} <= mine, mine
    assert verify_audit_log().ok

    hits = (
        _hits(written) + _hits(logs) + _hits(prefect_server["home"])
        + _hits(site_dir(), skip=PRIVATE_SITE_FILES)
    )
    assert not hits, f"the sentinel was written to: {hits}"
    # The private index does hold the path (that is its job): it must be owner-only.
    index = site_dir() / "slide-index.json"
    assert SENTINEL.encode() in index.read_bytes()
    assert index.stat().st_mode & 0o077 == 0
    for spec in (site_dir() / "batches").glob("*"):
        assert spec.stat().st_mode & 0o077 == 0, "batch specs hold slide paths: they must be owner-only"


def _permissions_apply(tmp_path: Path) -> list[str]:
    """A command prefix under which file permissions hold: none for a normal user; for root,
    root without its permission-bypass capabilities (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH).
    User nobody would do too, but cannot start this Python when it lives under /root."""
    import shutil

    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv (util-linux): permission errors cannot be produced")
    prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search"]
    locked = tmp_path / "probe"
    locked.write_bytes(b"x")
    locked.chmod(0)
    if subprocess.run([*prefix, "cat", str(locked)], capture_output=True, timeout=30).returncode == 0:
        pytest.skip("dropping root's capabilities does not make permissions apply here")
    return prefix


@pytest.mark.slow
def test_unreadable_folders_and_dicom_instance_names_never_reach_the_terminal(wsiflow_cli, tmp_path):
    """Issue 14, item 6: an unreadable slide folder, a slide in a folder this user may not
    search (as a file, a folder and a glob argument), a damaged DICOM-WSI whose instance
    files carry the sentinel (inspect, run, deid) and one with an instance this user may not
    read give one-line errors, with --verbose logs, and no trace of the
    sentinel or a traceback on stdout or stderr."""
    import shutil

    from tests.conftest import shared_file

    prefix = _permissions_apply(tmp_path)
    locked = write_sentinel_svs(tmp_path / "locked").parent  # case-<sentinel>/, made unreadable
    closed_slide = write_sentinel_svs(tmp_path / "closed")
    closed = closed_slide.parent  # listed, not entered
    dicom = tmp_path / f"dicom-{SENTINEL}"
    dicom.mkdir()
    for i, instance in enumerate(sorted(shared_file("dicom/cmu-1-small-region-lossless").iterdir())):
        shutil.copyfile(instance, dicom / f"{SENTINEL}-{i}.dcm")
    shared = tmp_path / f"dicom-locked-{SENTINEL}"  # intact, but one instance this user may not read
    shutil.copytree(dicom, shared)
    for folder in (dicom, shared):
        for instance in folder.iterdir():
            instance.chmod(0o644)  # the shared copies may be read-only
    largest = max(dicom.iterdir(), key=lambda p: p.stat().st_size)  # level 0: cut inside its frames
    with open(largest, "r+b") as fh:
        fh.truncate(largest.stat().st_size // 2)
    unreadable_instance = max(shared.iterdir(), key=lambda p: p.stat().st_size)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    cases = [
        ("inspect", [str(locked)], 1, "permission-denied"),
        ("run", [str(locked), "--out", str(out)], 1, "permission-denied"),
        ("inspect", [str(closed_slide)], 2, "cannot be reached: permission denied"),
        ("run", [str(closed_slide), "--out", str(out)], 2, "cannot be reached: permission denied"),
        ("run", [str(closed), "--out", str(out)], 2, "cannot be reached: permission denied"),
        ("run", [str(closed / "*.svs"), "--out", str(out)], 2, "cannot be reached: permission denied"),
        ("inspect", [str(closed / "other.svs")], 2, "cannot be reached: permission denied"),
        ("run", [str(dicom), "--out", str(out)], 1, "corrupt"),
        ("inspect", [str(dicom)], 1, "corrupt"),
        ("deid", [str(dicom), str(out / "deid-damaged")], 1, "deid"),
        ("inspect", [str(shared)], 1, "permission-denied"),
        ("run", [str(shared), "--out", str(out)], 1, "permission-denied"),
        ("deid", [str(shared), str(out / "deid-locked")], 1, "permission-denied"),
    ]
    locked.chmod(0)
    closed.chmod(0o644)
    unreadable_instance.chmod(0)
    try:
        for command, arguments, code, expected in cases:
            done = subprocess.run([*prefix, *wsiflow_cli, "--verbose", command, *arguments], env=env,
                                  capture_output=True, text=True, timeout=600)
            shown = done.stdout + done.stderr
            where = f"wsiflow {command} ({expected}):\n{shown[-3000:]}"
            assert done.returncode == code, where
            assert expected in shown and "Traceback" not in shown, where
            assert not any(n in shown.encode("utf-8") for n in _variants(SENTINEL)), where
            assert str(tmp_path) not in shown.replace(str(out), ""), where
    finally:
        locked.chmod(0o755)
        closed.chmod(0o755)
        unreadable_instance.chmod(0o644)
