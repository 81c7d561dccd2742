"""Network guard for the test suite, loaded by every Python process the tests start.

The suite puts this folder on PYTHONPATH and names a log file in WSIFLOW_NETGUARD_LOG;
Python imports ``sitecustomize`` at start-up, so the Prefect server, Dask workers and
CLI subprocesses all record (via an audit hook, without blocking) every attempt to
connect to, send to or resolve a non-loopback address. The suite fails on any entry.
"""

from __future__ import annotations

import os
import sys

__all__ = ["install"]


def install(log_path: str) -> None:
    """Record non-loopback socket use of this process in ``log_path`` (one line each)."""
    import ipaddress
    import socket
    import traceback

    local_names = {"localhost", "localhost.localdomain", "ip6-localhost", "", None}
    try:
        local_names.add(socket.gethostname())
    except OSError:
        pass

    def is_local(host: object) -> bool:
        if host in local_names:
            return True
        if isinstance(host, bytes):
            host = host.decode("ascii", "replace")
        if not isinstance(host, str):
            return False
        try:
            address = ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            return host.endswith(".localhost")
        return address.is_loopback or address.is_unspecified

    def record(event: str, destination: str) -> None:
        stack = "".join(traceback.format_stack(limit=8)[:-2]).replace("\n", " | ")
        line = f"pid={os.getpid()} prog={os.path.basename(sys.argv[0] if sys.argv else '?')} {event} -> {destination} :: {stack}\n"
        with open(log_path, "a", encoding="utf-8") as fh:
            fh.write(line)

    def hook(event: str, args: tuple) -> None:
        if event in ("socket.connect", "socket.sendto"):
            sock, address = args[0], args[1]
            if getattr(sock, "family", None) not in (socket.AF_INET, socket.AF_INET6):
                return
            host = address[0] if isinstance(address, tuple) else address
            if not is_local(host):
                record(event, f"{host}:{address[1] if isinstance(address, tuple) and len(address) > 1 else '?'}")
        elif event == "socket.getaddrinfo":
            host = args[0]
            if not is_local(host):
                record(event, f"{host!s}")

    sys.addaudithook(hook)


_LOG = os.environ.get("WSIFLOW_NETGUARD_LOG")
if _LOG:
    try:
        install(_LOG)
    except Exception as exc:  # noqa: BLE001 -- a broken guard must not break the program it watches
        sys.stderr.write(f"wsiflow netguard not installed: {exc!r}\n")
