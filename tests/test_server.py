"""``wsiflow server`` on a non-default port: the UI finds its API there, promotions off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import pytest

from tests.conftest import _free_port, wait_for_prefect_server

pytestmark = pytest.mark.slow


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def test_server_on_another_port_serves_a_ui_that_finds_its_api(wsiflow_cli, tmp_path):
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home")}
    env.pop("PREFECT_API_URL", None)
    log = open(tmp_path / "server.log", "w")
    process = subprocess.Popen([*wsiflow_cli, "server", "--port", str(port)], env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_prefect_server(process, f"{base}/api", tmp_path / "server.log")
        ui = _get(f"{base}/ui-settings")
        assert ui["api_url"] == f"{base}/api"  # not the default port 4200
        settings = _get(f"{base}/api/admin/settings")
        assert settings["server"]["ui"]["show_promotional_content"] is False
        assert settings["server"]["analytics_enabled"] is False
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


# --- Authentication (issue 14, item 5) ---------------------------------------------------

AUTH = "wsiflow-admin:s3cret-for-the-test"


def _server_env(tmp_path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home"), **extra}
    for name in ("PREFECT_API_URL", "PREFECT_SERVER_API_AUTH_STRING", "PREFECT_API_AUTH_STRING"):
        if name not in extra:
            env.pop(name, None)
    return env


def test_loopback_hosts_are_told_apart_without_a_lookup():
    from flows.cli._serve import is_loopback_host

    assert all(is_loopback_host(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST",
                                              "::ffff:127.0.0.1"))
    assert not any(is_loopback_host(h) for h in ("0.0.0.0", "::", "", "10.0.0.5", "192.168.1.20", "fe80::1",
                                                  "lab-server", "localhost.evil.example"))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "lab-server.example.internal"])
def test_a_reachable_host_without_authentication_is_refused(wsiflow_cli, tmp_path, host):
    done = subprocess.run([*wsiflow_cli, "server", "--host", host, "--port", str(_free_port())],
                          env=_server_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()  # one line, no traceback, nothing started
    assert line.startswith("wsiflow: error config: ") and f"--host {host} " in line
    assert "PREFECT_SERVER_API_AUTH_STRING" in line and "--allow-unauthenticated" in line
    assert "reverse proxy" in line
    assert "Prefect server on" not in done.stdout


def test_allow_unauthenticated_is_an_explicit_choice_and_says_so(wsiflow_cli, tmp_path):
    import socket

    # The port is held here, so Prefect stops at "port in use": nothing is ever served.
    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        port = held.getsockname()[1]
        done = subprocess.run([*wsiflow_cli, "server", "--host", "0.0.0.0", "--port", str(port),
                               "--allow-unauthenticated"], env=_server_env(tmp_path), capture_output=True,
                              text=True, timeout=180)
    assert "Prefect server on http://" in done.stdout, done.stderr
    assert f"wsiflow: warning: --allow-unauthenticated: anyone who reaches 0.0.0.0:{port}" in done.stderr
    assert "already in use" in done.stdout + done.stderr


def _status(url: str, *, auth: str | None = None, data: bytes | None = None) -> int:
    import base64
    import urllib.error

    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    request.add_header("Content-Type", "application/json")
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_with_an_auth_string_the_server_on_all_interfaces_requires_it(wsiflow_cli, tmp_path):
    port = _free_port()
    env = _server_env(tmp_path, PREFECT_SERVER_API_AUTH_STRING=AUTH)
    log = open(tmp_path / "server.log", "w")
    process = subprocess.Popen([*wsiflow_cli, "server", "--host", "0.0.0.0", "--port", str(port)], env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_prefect_server(process, f"{base}/api", tmp_path / "server.log")  # health needs no auth
        assert _get(f"{base}/ui-settings")["auth"] == "BASIC"  # the UI asks for the credentials
        flows = f"{base}/api/flows/filter"
        assert _status(flows, data=b"{}") == 401
        assert _status(flows, data=b"{}", auth="wsiflow-admin:wrong") == 401
        assert _status(f"{base}/api/admin/settings") == 401
        assert _status(flows, data=b"{}", auth=AUTH) == 200
        # A Prefect client with PREFECT_API_AUTH_STRING set (what wsiflow's commands use) gets in.
        client = ("import asyncio\n"
                  "from prefect.client.orchestration import get_client\n"
                  "async def main():\n"
                  "    async with get_client() as client:\n"
                  "        print('flows', len(await client.read_flows()))\n"
                  "asyncio.run(main())\n")
        ok = subprocess.run([sys.executable, "-c", client], capture_output=True, text=True, timeout=120,
                            env={**env, "PREFECT_API_URL": f"{base}/api", "PREFECT_API_AUTH_STRING": AUTH})
        assert ok.returncode == 0 and "flows 0" in ok.stdout, ok.stderr[-2000:]
        refused = subprocess.run([sys.executable, "-c", client], capture_output=True, text=True, timeout=120,
                                 env={**_server_env(tmp_path), "PREFECT_API_URL": f"{base}/api"})
        assert refused.returncode != 0 and "401" in refused.stderr
        log.flush()
        assert AUTH not in (tmp_path / "server.log").read_text()  # the secret is never printed
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
