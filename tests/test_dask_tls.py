"""Dask over TLS for real: a CA and certificates made here, a ``dask scheduler`` and a
``dask worker`` started with them on 127.0.0.1, and ``wsiflow run`` sending chunks to the
``tls://`` address with the certificates of its config (``dask.tls_*``). The result equals
a local run bit for bit; a missing, foreign or wrongly signed certificate stops the run in
seconds with one error line (exit 2, no traceback).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

distributed = pytest.importorskip("distributed")
x509 = pytest.importorskip("cryptography.x509")
# The tests with a scheduler, a worker and CLI runs over a real slide are marked slow (a few minutes).

from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

_RUN_OPTIONS = ("--chunk-cells", "2", "--device", "cpu", "--batch-size", "16", "--json")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_pem(folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    (folder / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{stem}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    os.chmod(folder / f"{stem}.key", 0o600)


_Issuer = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: _Issuer | None) -> x509.Certificate:
    """A CA (``issuer`` None: self-signed) or a leaf for both TLS roles (Dask workers are
    servers and clients) with 127.0.0.1 as its address."""
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer[0].subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True)
        return builder.sign(key, hashes.SHA256())
    builder = (
        builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
    )
    return builder.sign(issuer[1], hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ca``, ``scheduler``, ``worker``, ``client`` (signed by ``ca``), and ``foreign-ca`` with
    its own ``foreign-client``: ``NAME.pem`` certificates, ``NAME.key`` keys."""
    folder = tmp_path_factory.mktemp("pki")
    for ca_name, leaves in (("ca", ("scheduler", "worker", "client")), ("foreign-ca", ("foreign-client",))):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _certificate(ca_name, ca_key, None)
        _write_pem(folder, ca_name, ca, ca_key)
        for leaf in leaves:
            key = ec.generate_private_key(ec.SECP256R1())
            _write_pem(folder, leaf, _certificate(leaf, key, (ca, ca_key)), key)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _dask_cli() -> str:
    return str(Path(sys.executable).with_name("dask"))


def _tls_options(pki: Path, name: str) -> list[str]:
    return ["--tls-ca-file", str(pki / "ca.pem"), "--tls-cert", str(pki / f"{name}.pem"),
            "--tls-key", str(pki / f"{name}.key")]


@pytest.fixture(scope="module")
def tls_scheduler(pki: Path, tmp_path_factory: pytest.TempPathFactory):
    """``tls://127.0.0.1:PORT`` of a real scheduler with one worker, both started with certificates."""
    from distributed import Client
    from distributed.security import Security

    logs = tmp_path_factory.mktemp("dask-logs")
    port = _free_port()
    address = f"tls://127.0.0.1:{port}"
    processes: list[subprocess.Popen[bytes]] = []
    try:
        processes.append(subprocess.Popen(
            [_dask_cli(), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard",
             "--protocol", "tls", *_tls_options(pki, "scheduler")],
            stdout=subprocess.DEVNULL, stderr=open(logs / "scheduler.log", "wb"),  # noqa: SIM115
        ))
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        processes.append(subprocess.Popen(
            [_dask_cli(), "worker", address, "--host", "127.0.0.1", "--nworkers", "1", "--nthreads", "1",
             "--no-dashboard", *_tls_options(pki, "worker")],
            stdout=subprocess.DEVNULL, stderr=open(logs / "worker.log", "wb"),  # noqa: SIM115
        ))
        security = Security(tls_ca_file=str(pki / "ca.pem"), tls_client_cert=str(pki / "client.pem"),
                            tls_client_key=str(pki / "client.key"), require_encryption=True)
        with Client(address, security=security, timeout="60s") as client:
            client.wait_for_workers(1, timeout=120)
        yield address
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in reversed(processes):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def _config(tmp_path: Path, pki: Path, address: str, **files: str | None) -> Path:
    """A config file naming the scheduler and the certificates (``files``: key -> file in pki, None: left out)."""
    chosen = {"tls_ca_file": "ca.pem", "tls_client_cert": "client.pem", "tls_client_key": "client.key", **files}
    dask = {"address": address, **{k: str(pki / v) for k, v in chosen.items() if v is not None}}
    path = tmp_path / "wsiflow.yaml"
    path.write_text(yaml.safe_dump({"dask": dask}), encoding="utf-8")
    return path


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "WSIFLOW_CONFIG")}


def _run(cli: list[str], *args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cli, *map(str, args)], capture_output=True, text=True, timeout=600, env=_env())


def _heatmap(out: Path) -> np.ndarray:
    (level0,) = out.glob("*/*/v*/heatmap.ome.zarr/0")
    return np.asarray(zarr.open_array(str(level0), mode="r")[...])


@pytest.mark.slow
def test_run_over_tls_equals_a_local_run(pki, tls_scheduler, wsiflow_cli, cmu_svs, tmp_path):
    config = _config(tmp_path, pki, tls_scheduler)
    remote = _run(wsiflow_cli, "--config", config, "run", cmu_svs, "--out", tmp_path / "tls", *_RUN_OPTIONS)
    assert remote.returncode == 0, remote.stderr
    (row,) = json.loads(remote.stdout)["slides"]
    assert row["status"] == "done" and row["tiles"] > 0, row
    local = _run(wsiflow_cli, "run", cmu_svs, "--out", tmp_path / "local", *_RUN_OPTIONS)
    assert local.returncode == 0, local.stderr
    np.testing.assert_array_equal(_heatmap(tmp_path / "tls"), _heatmap(tmp_path / "local"))
    assert not list((tmp_path / "tls").rglob("slide-source.json")), "the source note outlived the run"


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("wsiflow: error config: ") and " -- " in line, result.stderr
    return line


@pytest.mark.slow
@pytest.mark.parametrize(
    ("files", "said"),
    [
        ({"tls_client_cert": None, "tls_client_key": None}, "dask.tls_client_cert is missing"),
        ({"tls_client_cert": "foreign-client.pem", "tls_client_key": "foreign-client.key"},
         "refused wsiflow's TLS client certificate"),
        ({"tls_ca_file": "foreign-ca.pem"}, "certificate that dask.tls_ca_file did not sign"),
        ({"tls_client_key": "worker.key"}, "is not a usable PEM certificate/key"),
        ({"tls_client_cert": "nowhere.pem"}, "does not exist"),
    ],
    ids=["no-client-cert", "foreign-client-cert", "foreign-ca", "key-of-another-cert", "missing-file"],
)
def test_a_wrong_certificate_is_one_line(pki, tls_scheduler, wsiflow_cli, cmu_svs, tmp_path, files, said):
    config = _config(tmp_path, pki, tls_scheduler, **files)
    started = time.monotonic()
    result = _run(wsiflow_cli, "--config", config, "run", cmu_svs, "--out", tmp_path / "out", *_RUN_OPTIONS)
    line = _one_error_line(result)
    assert said in line, line
    assert str(pki) not in line
    # Refused before any model or slide: nothing written, and not after Dask's 60 s connect timeout.
    assert not list((tmp_path / "out").glob("*/*"))
    assert time.monotonic() - started < 45


@pytest.mark.slow
def test_a_tls_scheduler_without_certificates_is_one_line(tls_scheduler, wsiflow_cli, cmu_svs, tmp_path):
    """``--dask-address tls://`` and no certificates in the config (nor Dask's own config)."""
    result = _run(wsiflow_cli, "run", cmu_svs, "--out", tmp_path, "--dask-address", tls_scheduler, *_RUN_OPTIONS)
    assert "no client certificates are configured" in _one_error_line(result)


@pytest.mark.slow
def test_the_executor_turns_a_refused_connection_into_one_error(pki, tls_scheduler, tmp_path, monkeypatch):
    """What a Prefect worker or a child process meets when the scheduler refuses the client
    certificate after the CLI's checks (certificates replaced meanwhile): a wsiflow error,
    which fails the slide with one line, not Dask's traceback. Also: no certificates at all."""
    import flows._dask as dask_module
    from flows._dask import _connect, dask_security
    from pipeline import ConfigError, RunSettings, WorkerError

    foreign = RunSettings(out_dir=tmp_path, model="tissue-qc", dask_address=tls_scheduler,
                          dask_tls_ca_file=pki / "ca.pem", dask_tls_client_cert=pki / "foreign-client.pem",
                          dask_tls_client_key=pki / "foreign-client.key")
    monkeypatch.setattr(dask_module, "_CONNECT_TIMEOUT", "3s")  # Dask retries a refused handshake until then
    with pytest.raises(WorkerError, match="cannot connect to the Dask scheduler"):
        _connect(tls_scheduler, dask_security(foreign))
    with pytest.raises(ConfigError, match="needs TLS, but no certificates are configured"):
        _connect(tls_scheduler, None)


def test_the_config_certificates_reach_the_run_settings_and_dask(tmp_path):
    """config dask.tls_* -> RunSettings (and through JSON, as batch and inbox store them) ->
    the client's Security; a tcp:// --dask-address (a local cluster) does not take them."""
    from flows import parse_config
    from flows._dask import dask_security
    from flows.cli import build_parser
    from flows.cli._options import settings_from_options
    from pipeline import RunSettings

    config = parse_config({"dask": {"address": "tls://10.0.0.5:8786", "tls_ca_file": "/tls/ca.pem",
                                    "tls_client_cert": "/tls/client.pem", "tls_client_key": "/tls/client.key"}})
    for command in (["run", "s.svs"], ["batch", "s.svs"], ["serve", "--inbox", "i"]):
        args = build_parser().parse_args([*command, "--out", str(tmp_path)])
        settings = RunSettings.from_json(settings_from_options(config, args).to_json())
        assert settings.dask_address == "tls://10.0.0.5:8786"
        assert (settings.dask_tls_ca_file, settings.dask_tls_client_cert, settings.dask_tls_client_key) == (
            Path("/tls/ca.pem"), Path("/tls/client.pem"), Path("/tls/client.key"))
        security = dask_security(settings)
        assert security.require_encryption
        assert (security.tls_ca_file, security.tls_client_cert, security.tls_client_key) == (
            "/tls/ca.pem", "/tls/client.pem", "/tls/client.key")
    args = build_parser().parse_args(["run", "s.svs", "--out", str(tmp_path), "--dask-address", "tcp://127.0.0.1:1"])
    local = settings_from_options(config, args)
    assert local.dask_tls_ca_file is None and local.dask_tls_client_cert is None and dask_security(local) is None
    args = build_parser().parse_args(["run", "s.svs", "--out", str(tmp_path), "--dask-address", "tls://10.0.0.6:1"])
    assert settings_from_options(config, args).dask_tls_client_cert == Path("/tls/client.pem")
