"""Shared fixtures: real data from ../shared/data (skipped when absent), an isolated site dir."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("WSIFLOW_TEST_DATA", ROOT.parent / "shared" / "data"))
SAMPLE_FALLBACK = ROOT / ".cache" / "sample" / "CMU-1-Small-Region.svs"


def _let_children_get_ctrl_c() -> None:
    """Let the tests' child processes get Ctrl-C as a terminal's programs do. A test run
    started in the background by a non-interactive shell (`nohup ... &`, some CI runners)
    begins with SIGINT ignored, and every child would inherit that: `wsiflow serve` and
    `pacs watch` (which rely on Python's KeyboardInterrupt) would then never see the SIGINT
    the tests send them. Handlers reset to the default across exec; "ignored" does not."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True, scope="session")
def _isolated_site(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Each test session gets its own site dir (secret, registry) and offline env."""
    os.environ["WSIFLOW_HOME"] = str(tmp_path_factory.mktemp("site"))
    os.environ.pop("WSIFLOW_CONFIG", None)
    from pipeline import apply_offline_env

    apply_offline_env()


def shared_file(relative: str) -> Path:
    """A file from the shared data folder, or skip the test saying where it was looked for."""
    path = DATA_DIR / relative
    if not path.exists() and relative == "slides/CMU-1-Small-Region.svs" and SAMPLE_FALLBACK.exists():
        return SAMPLE_FALLBACK
    if not path.exists():
        pytest.skip(f"test data {relative} not found under {DATA_DIR} (set WSIFLOW_TEST_DATA)")
    return path


@pytest.fixture
def cmu_svs() -> Path:
    return shared_file("slides/CMU-1-Small-Region.svs")


@pytest.fixture
def wsiflow_cli() -> list[str]:
    """The installed console script, run as a real subprocess."""
    exe = shutil.which("wsiflow", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("the wsiflow console script is not installed in this environment")
    return [exe]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_prefect_server(process: subprocess.Popen, api_url: str, log_path: Path) -> None:
    """Wait until the server at ``api_url`` answers its health check (it takes 20-60 s)."""
    deadline = time.monotonic() + 240
    while True:
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the Prefect server did not start: {log_path.read_text()[-2000:]}")
        time.sleep(1)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> object:
    """One real Prefect server for the whole session (it takes 20-60 s to start), on 127.0.0.1."""
    pytest.importorskip("prefect")
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_UI_ENABLED": "false",
    }
    prefect = shutil.which("prefect", path=str(Path(sys.executable).parent))
    log = open(home / "server.log", "w")
    process = subprocess.Popen(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/api"
    wait_for_prefect_server(process, url, home / "server.log")
    yield {"url": url, "home": home, "env": env}
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


_XVFB: subprocess.Popen | None = None
NETGUARD_DIR = Path(__file__).resolve().parent / "_netguard"
_NETGUARD_LOG: Path | None = None


def _install_netguard() -> None:
    """Record non-loopback network use of this process and of every Python it starts."""
    global _NETGUARD_LOG
    import tempfile

    fd, name = tempfile.mkstemp(prefix="wsiflow-netguard-", suffix=".log")
    os.close(fd)
    _NETGUARD_LOG = Path(name)
    os.environ["WSIFLOW_NETGUARD_LOG"] = name
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(NETGUARD_DIR), os.environ.get("PYTHONPATH")]))
    # This process started before PYTHONPATH named the guard: load it by path (it installs
    # itself for the log just named).
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("_wsiflow_netguard", NETGUARD_DIR / "sitecustomize.py")
    spec.loader.exec_module(module_from_spec(spec))  # type: ignore[union-attr, arg-type]


def netguard_entries(start: int = 0) -> list[str]:
    """Lines the guard recorded (from byte ``start``)."""
    if _NETGUARD_LOG is None or not _NETGUARD_LOG.exists():
        return []
    with open(_NETGUARD_LOG, encoding="utf-8") as fh:
        fh.seek(start)
        return [line for line in fh.read().splitlines() if line.strip()]


@pytest.fixture(autouse=True)
def _no_outbound_network() -> object:
    """Fail the test during which any process of the suite tried to reach a non-loopback address."""
    start = _NETGUARD_LOG.stat().st_size if _NETGUARD_LOG and _NETGUARD_LOG.exists() else 0
    yield
    new = netguard_entries(start)
    if new:
        destinations = sorted({line.split(" -> ", 1)[1].split(" :: ", 1)[0] for line in new})
        pytest.fail(f"outbound network attempt(s) to {', '.join(destinations)}:\n" + "\n".join(new[:5]))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    entries = netguard_entries()
    if entries:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"NETWORK GUARD: {len(entries)} outbound attempt(s) during the session:", red=True)
            for line in entries[:20]:
                reporter.write_line("  " + line[:400])
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_configure(config: pytest.Config) -> None:
    """The network guard, and a virtual screen for napari when there is none (Qt needs one for OpenGL)."""
    global _XVFB
    _let_children_get_ctrl_c()
    _install_netguard()
    if os.environ.get("DISPLAY") or shutil.which("Xvfb") is None:
        return
    for number in range(90, 110):
        if not Path(f"/tmp/.X11-unix/X{number}").exists() and not Path(f"/tmp/.X{number}-lock").exists():
            break
    _XVFB = subprocess.Popen(
        ["Xvfb", f":{number}", "-screen", "0", "1280x1024x24", "-nolisten", "tcp"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        if Path(f"/tmp/.X11-unix/X{number}").exists():
            break
        import time

        time.sleep(0.05)
    os.environ["DISPLAY"] = f":{number}"
    os.environ.setdefault("QT_QPA_PLATFORM", "xcb")


def pytest_unconfigure(config: pytest.Config) -> None:
    if _NETGUARD_LOG is not None and _NETGUARD_LOG.exists() and _NETGUARD_LOG.stat().st_size == 0:
        _NETGUARD_LOG.unlink()  # a non-empty log is kept for inspection
    if _XVFB is not None:
        _XVFB.terminate()
        _XVFB.wait(timeout=10)
