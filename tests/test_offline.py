"""Offline by construction: the main jobs run in a network namespace that has only loopback.

The outer test (root + ``unshare`` needed, else skipped with the reason) re-runs a set of
real tests inside ``unshare --net``: ``make demo``, a flow on a real Prefect server, a
multi-process Dask run and the napari reader. Anything that needed the internet fails
there. The inner-only tests below check the namespace itself and run the demo.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys

import pytest

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


@pytest.mark.slow
@pytest.mark.skipif(INSIDE, reason="this is the outer test; it does not nest")
def test_main_jobs_run_in_a_namespace_with_only_loopback(tmp_path):
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    env = {**os.environ, "WSIFLOW_INSIDE_OFFLINE_NETNS": "1"}
    command = [
        "unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "inner"),
        "-o", "addopts=-ra", *INNER_TESTS,
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    tail = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 0, f"offline run failed:\n{tail}"
    summary = done.stdout.strip().splitlines()[-1]
    assert "failed" not in summary and "error" not in summary, tail
    # Skips inside would hide a missing proof: every inner test must actually have run.
    assert "skipped" not in summary, f"tests were skipped inside the namespace:\n{tail}"


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
