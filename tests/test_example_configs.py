"""Every example config in configs/ parses into a valid WsiflowConfig."""

import gc
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import pytest

from flows import WsiflowConfig, load_config
from flows._config import parse_config
from flows.cli._serve import is_loopback_host
from models import Registry
from pipeline import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_the_examples_are_there():
    assert {"default.yaml", "local.yaml", "gpu-server.yaml", "slurm.yaml", "kubernetes.yaml"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_config_is_valid(path):
    config = load_config(path)
    assert isinstance(config, WsiflowConfig)
    # Its grid fits its default model (the bundled registry's; tile size and µm/px are the
    # model's unless the config names them): the grid a run would use is a real one.
    preprocessing = Registry().resolve(config.models.default).manifest.preprocessing
    spec = config.grid.spec(preprocessing, config.models.default)
    assert spec.tile_size_px == preprocessing.tile_size_px > 0
    assert spec.target_mpp == preprocessing.target_mpp > 0


def test_cluster_examples_name_a_scheduler():
    by_name = {p.name: load_config(p) for p in CONFIGS}
    for name in ("gpu-server.yaml", "slurm.yaml", "kubernetes.yaml"):
        assert by_name[name].dask.address.startswith(("tcp://", "tls://"))
    assert by_name["local.yaml"].dask.address is None


def _host(address: str) -> str:
    return urllib.parse.urlsplit(address).hostname or ""


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_beyond_loopback_the_examples_use_tls_with_certificates(path):
    """Issue 14, item 8: over tcp:// anyone who reaches the scheduler reads slide paths and
    runs code on the workers, so an example leaves loopback only with mutual TLS."""
    dask = load_config(path).dask
    if dask.address is not None and not is_loopback_host(_host(dask.address)):
        assert dask.address.startswith("tls://"), f"{path.name}: {dask.address} is not TLS"
        assert dask.tls_ca_file and dask.tls_client_cert, f"{path.name}: TLS without the client's certificates"
    text = path.read_text(encoding="utf-8")
    # Nothing in an example (its comments included) binds a scheduler to every interface.
    assert not re.search(r"""["']?host["']?\s*[:=]\s*["']?(0\.0\.0\.0|::)["']?|--host[ =](0\.0\.0\.0|::)\b""", text)
    if "SLURMCluster(" in text:  # the cluster the example starts speaks TLS only
        assert 'protocol="tls://"' in text and "security=security" in text and "require_encryption=True" in text
    if "dask-scheduler" in text:
        assert "--protocol, tls" in text and text.count("--tls-cert") >= 2


@pytest.mark.parametrize(
    ("dask", "match"),
    [
        ({"address": "tcp://10.0.0.5:8786", "tls_ca_file": "/tls/ca.pem", "tls_client_cert": "/tls/c.pem"},
         "dask.tls_ca_file is set, but dask.address is not a tls://"),
        ({"tls_ca_file": "/tls/ca.pem", "tls_client_cert": "/tls/c.pem"}, "not a tls://"),
        ({"address": "tls://10.0.0.5:8786", "tls_ca_file": "/tls/ca.pem"}, "dask.tls_client_cert is missing"),
        ({"address": "tls://10.0.0.5:8786", "tls_client_cert": "/tls/c.pem"}, "dask.tls_ca_file is missing"),
    ],
)
def test_tls_settings_that_cannot_work_are_refused_when_the_config_loads(dask, match):
    with pytest.raises(ConfigError, match=match):
        parse_config({"dask": dask})


def test_tls_settings_parse():
    config = parse_config({"dask": {"address": "tls://10.0.0.5:8786", "tls_ca_file": "/tls/ca.pem",
                                    "tls_client_cert": "/tls/c.pem"}})
    assert config.dask.tls_ca_file == Path("/tls/ca.pem") and config.dask.tls_client_key is None
    assert parse_config({"dask": {"address": "tls://10.0.0.5:8786"}}).dask.tls_ca_file is None  # Dask's own config


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=120)


@pytest.mark.slow
def test_the_documented_certificates_and_tls_keys_connect_and_a_plain_client_is_refused(tmp_path):
    """The recipe of configs/slurm.yaml (openssl, then Security for the cluster) and the
    config's tls_* keys as the client's Security: the client computes on the TLS
    scheduler; a client without them, or with another authority's certificate, cannot."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    from distributed import Client, LocalCluster, Security

    for authority in ("site", "other"):
        folder = tmp_path / authority
        folder.mkdir()
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=wsiflow-dask-ca",
                 "-keyout", "ca.key", "-out", "ca.pem", cwd=folder)
        for who in ("cluster", "client"):
            _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=wsiflow-dask-{who}", "-keyout",
                     f"{who}.key", "-out", f"{who}.csr", cwd=folder)
            _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                     "-days", "2", "-out", f"{who}.pem", cwd=folder)
    site = tmp_path / "site"
    cluster_security = Security(
        tls_ca_file=str(site / "ca.pem"), require_encryption=True,
        tls_scheduler_cert=str(site / "cluster.pem"), tls_scheduler_key=str(site / "cluster.key"),
        tls_worker_cert=str(site / "cluster.pem"), tls_worker_key=str(site / "cluster.key"),
        tls_client_cert=str(site / "client.pem"), tls_client_key=str(site / "client.key"),
    )
    with LocalCluster(protocol="tls://", host="127.0.0.1", security=cluster_security, n_workers=1,
                      threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tls://127.0.0.1:")

        def client_security(folder: Path) -> Security:
            dask = parse_config({"dask": {"address": address, "tls_ca_file": str(folder / "ca.pem"),
                                          "tls_client_cert": str(folder / "client.pem"),
                                          "tls_client_key": str(folder / "client.key")}}).dask
            return Security(tls_ca_file=str(dask.tls_ca_file), tls_client_cert=str(dask.tls_client_cert),
                            tls_client_key=str(dask.tls_client_key), require_encryption=True)

        with Client(address, security=client_security(site), timeout="20s") as client:
            assert client.submit(sum, [1, 2, 3]).result(timeout=30) == 6
        # A client that failed to start is collected here, not inside the next one's start
        # (its __del__ would wait for a loop that the next start holds).
        with pytest.raises(TypeError, match="TLS expects a `ssl_context`"):
            Client(address, timeout="3s")  # no certificates: no TLS context
        gc.collect()
        with pytest.raises(OSError, match="TLS certificate does not match"):
            Client(address, security=client_security(tmp_path / "other"), timeout="3s")
        gc.collect()
