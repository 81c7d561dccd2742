"""``wsiflow server`` on a non-default port: the UI finds its API there, promotions off."""

from __future__ import annotations

import json
import os
import subprocess
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
