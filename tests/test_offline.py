"""Offline by construction: the main jobs run in a network namespace that has only loopback.

The outer test (root + ``unshare`` needed, else skipped with the reason) re-runs a set of
real tests inside ``unshare --net``: ``make demo``, a flow on a real Prefect server, a
multi-process Dask run and the napari reader. Anything that needed the internet fails
there. The inner-only tests below check the namespace itself and run the demo. A second
outer test (also skipped when Orthanc is not installed) runs the hospital loop there: a
real Orthanc on loopback, ``wsiflow pacs watch --once``, the results found back in the study.
A third runs a federation there: a coordinator and two site processes over TLS on 127.0.0.1.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests._orthanc import orthanc_missing, running_orthanc
from tests.conftest import ROOT, shared_file

INSIDE = os.environ.get("WSIFLOW_INSIDE_OFFLINE_NETNS") == "1"

INNER_TESTS = [
    "tests/test_offline.py::test_namespace_has_only_loopback",
    "tests/test_offline.py::test_make_demo_runs_offline",
    "tests/test_prefect_batch.py::test_batch_flow_on_the_server",
    "tests/test_dask_chunks.py::test_dask_result_is_bit_identical_and_models_stay_on_workers",
    "tests/test_viewer_reader.py",
]


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create a network namespace (run make test as root, or see docs/security.md)"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare (util-linux) and ip (iproute2)"
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare --net is not permitted here: {probe.stderr.strip()[:200]}"
    return None


def _run_inside(tests: list[str], basetemp: os.PathLike[str]) -> None:
    """Run ``tests`` with pytest in a new network namespace that has only loopback; all must pass."""
    env = {**os.environ, "WSIFLOW_INSIDE_OFFLINE_NETNS": "1"}
    command = [
        "unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(basetemp),
        "-o", "addopts=-ra", *tests,
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    tail = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 0, f"offline run failed:\n{tail}"
    summary = done.stdout.strip().splitlines()[-1]
    assert "failed" not in summary and "error" not in summary, tail
    # Skips inside would hide a missing proof: every inner test must actually have run.
    assert "skipped" not in summary, f"tests were skipped inside the namespace:\n{tail}"


@pytest.mark.slow
@pytest.mark.skipif(INSIDE, reason="this is the outer test; it does not nest")
def test_main_jobs_run_in_a_namespace_with_only_loopback(tmp_path):
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    _run_inside(INNER_TESTS, tmp_path / "inner")


@pytest.mark.slow
@pytest.mark.skipif(INSIDE, reason="this is the outer test; it does not nest")
def test_the_pacs_loop_runs_in_a_namespace_with_only_loopback(tmp_path):
    reason = _netns_unavailable() or orthanc_missing()
    if reason:
        pytest.skip(reason)
    shared_file("dicom/cmu-1-small-region-lossless")  # skip here, with the reason, rather than inside
    _run_inside(["tests/test_offline.py::test_namespace_has_only_loopback",
                 "tests/test_offline.py::test_pacs_loop_runs_offline"], tmp_path / "inner")


@pytest.mark.slow
@pytest.mark.skipif(INSIDE, reason="this is the outer test; it does not nest")
def test_the_federation_runs_in_a_namespace_with_only_loopback(tmp_path):
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    shared_file("images/he-tumour-1000px.png")  # skip here, with the reason, rather than inside
    _run_inside(["tests/test_offline.py::test_namespace_has_only_loopback",
                 "tests/test_offline.py::test_federation_runs_offline"], tmp_path / "inner")


@pytest.mark.skipif(not INSIDE, reason="runs only inside the offline network namespace")
def test_namespace_has_only_loopback():
    # /proc/net/dev is per network namespace (/sys/class/net shows the host's when sysfs is shared).
    lines = open("/proc/self/net/dev", encoding="ascii").read().splitlines()[2:]
    assert sorted(line.split(":")[0].strip() for line in lines) == ["lo"]
    # A deliberate probe, in a process the network guard does not watch.
    probe = (
        "import socket\n"
        "s = socket.socket(); s.settimeout(2)\n"
        "try:\n    s.connect(('192.0.2.1', 443))\nexcept OSError as e:\n    print(e.errno)\nelse:\n    print('connected')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("WSIFLOW_NETGUARD_LOG", "PYTHONPATH")}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=30)
    # TEST-NET-1 must be unreachable at once, not merely slow to answer.
    assert done.stdout.strip() in (str(errno.ENETUNREACH), str(errno.EHOSTUNREACH)), done.stdout + done.stderr


@pytest.mark.skipif(not INSIDE, reason="runs only inside the offline network namespace")
def test_make_demo_runs_offline(tmp_path):
    shared_file("slides/CMU-1-Small-Region.svs")  # the demo's sample comes from here (or .cache) offline
    out = tmp_path / "demo-out"
    done = subprocess.run(
        ["make", "--no-print-directory", "demo", f"DEMO_OUT={out}", f"PYTHON={sys.executable}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    # OUT/<slide id>/tissue-qc/v<version>-<digest>/ holds the result; `latest` points at it.
    results = list(out.glob("s-*/tissue-qc/v*/result.json"))
    assert len(results) == 1, sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))[:20]
    latest = results[0].parent.parent / "latest"
    assert latest.is_symlink() and latest.resolve() == results[0].parent.resolve()
    assert "creating .venv" not in done.stdout, "make demo tried to (re)install: the venv was not up to date"


@pytest.mark.skipif(not INSIDE, reason="runs only inside the offline network namespace")
def test_pacs_loop_runs_offline(tmp_path, wsiflow_cli):
    from pipeline import ResultFolder, read_source_level0
    from tests.test_pacs import _check_results, _stored_results

    slide = shared_file("dicom/cmu-1-small-region-lossless")
    source = read_source_level0(slide)
    out = tmp_path / "out"
    with running_orthanc(tmp_path / "orthanc") as archive:  # on 127.0.0.1: the only network there is
        archive.upload(slide)
        done = subprocess.run(
            [*wsiflow_cli, "pacs", "watch", "--dicomweb", archive.dicomweb, "--once", "--settle-s", "0",
             "--out", str(out), "--json"], capture_output=True, text=True, timeout=900,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        look = json.loads(done.stdout.strip().splitlines()[-1])
        [slide_done] = look["slides"]
        assert slide_done["status"] == "processed" and slide_done["stored"] == 2, look
        folder = ResultFolder.find(out / slide_done["slide_id"] / "tissue-qc")
        assert folder is not None
        seg, ann = _stored_results(archive, source.StudyInstanceUID)
        _check_results(seg, ann, source, folder)


@pytest.mark.skipif(not INSIDE, reason="runs only inside the offline network namespace")
def test_federation_runs_offline(tmp_path):
    """One round, two sites, the untrained tiny model: this proves the network path (TLS on
    loopback, Flower telemetry off), not learning (tests/test_federate.py does that). The sites
    start before the coordinator: each waits for its port."""
    from models import keygen
    from tests._federate_data import add_base_model, base_model, make_sites, make_tls
    from tests.test_federate import WSIFLOW, _env, _finish, _free_port, _registry

    # The two sites quickest to build (no defocus) that hold all four classes between them.
    sites = make_sites(tmp_path / "data", shared_file("images/he-tumour-1000px.png"),
                       names=("hospital-a", "hospital-c"))
    homes = {name: tmp_path / name for name in ("coordinator", *(s.name for s in sites))}
    base = base_model()
    for home in homes.values():
        home.mkdir()
        add_base_model(_registry(home), base)
    ca, cert, key = make_tls(tmp_path / "tls")
    keys = {site.name: tmp_path / f"{site.name}.pem" for site in sites}
    listed = tmp_path / "sites.txt"
    listed.write_text("".join(keygen(path)[1] + "\n" for path in keys.values()))
    port = _free_port()
    # The coordinator takes its settings from the config's federation.serve section.
    config = tmp_path / "coordinator.yaml"
    config.write_text(json.dumps({"federation": {"serve": {
        "model": "fedbase@1", "address": f"127.0.0.1:{port}", "rounds": 1, "min_sites": 2, "local_epochs": 1,
        "batch_size": 8, "tls_ca_file": str(ca), "tls_cert_file": str(cert), "tls_key_file": str(key),
        "site_keys_file": str(listed), "secure_aggregation": True}}}))
    joins = [subprocess.Popen(
        [*WSIFLOW, "federate", "join", "--server", f"127.0.0.1:{port}", "--tls-ca", str(ca), "--model", "fedbase@1",
         "--name", "fedqc", "--slides", str(site.slide), "--annotations", str(site.annotations), "--per-class", "8",
         "--site-key", str(keys[site.name]), "--json"], env=_env(homes[site.name]), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
        for site in sites]
    server = subprocess.Popen([*WSIFLOW, "--config", str(config), "federate", "serve", "--json"],
                              env=_env(homes["coordinator"]), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    results = [json.loads(_finish(j)) for j in joins]
    report = json.loads(_finish(server))
    assert report["rounds_completed"] == 1 and report["rounds"][0]["sites"] == 2, report
    digests = set()
    for site, result in zip(sites, results, strict=True):
        registry = _registry(homes[site.name])
        entry = registry.resolve(result["ref"])
        assert registry.is_candidate(entry) and result["rounds_trained"] == 1
        digests.add(entry.manifest.weights_sha256)
    assert len(digests) == 1, "both sites hold the same global model"
