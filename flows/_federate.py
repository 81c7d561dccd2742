"""Federated fine-tuning across sites with Flower: what the coordinator
(``flows._federate_serve``) and a site's process (``flows._federate_site``) share.

Transport: Flower's gRPC (bidirectional stream) server and client (``start_server`` /
``start_client``): one long-lived process per role that an operator starts and stops, TLS
from certificate files, no SuperLink/SuperNode/SuperExec and no app bundles to install at
the sites. The coordinator holds only the base model; each site trains on its own reviewed
annotations through :func:`models.train_module` and sends back only what
:func:`models.check_payload` allows, recording every outgoing message in its site dir.
The global model comes to every site in a final evaluate message and lands in the site's
registry as a candidate (never the default until validated there and promoted).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from models import (
    FederationError,
    PrivacySettings,
    SecAggParams,
)

if TYPE_CHECKING:
    pass

__all__ = [
    "FLOWER_OFFLINE_ENV",
    "STRATEGIES",
    "FederationSettings",
    "RoundStats",
    "Strategy",
    "TlsFiles",
    "apply_flower_offline_env",
    "from_parameters",
    "to_parameters",
    "settings_json",
]

_log = logging.getLogger(__name__)

FLOWER_OFFLINE_ENV: dict[str, str] = {
    # Read when flwr is imported: no usage events to telemetry.flower.ai.
    "FLWR_TELEMETRY_ENABLED": "0",
    # The flwr CLI's release check (not used by wsiflow; off in case a process imports it).
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}
"""Flower's own switches off the network; applied before flwr is first imported."""

Strategy = Literal["fedavg", "fedprox"]
STRATEGIES: tuple[Strategy, ...] = ("fedavg", "fedprox")

AUDIT_ACTION = "model-federate"
"""Every federation step in a site's and the coordinator's audit log."""


def apply_flower_offline_env() -> None:
    """Set :data:`FLOWER_OFFLINE_ENV` (where not set) before flwr is imported."""
    for key, value in FLOWER_OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the CA every party trusts; the coordinator's certificate and key."""

    ca: Path
    certificate: Path | None = None
    key: Path | None = None

    def server_tuple(self) -> tuple[bytes, bytes, bytes]:
        if self.certificate is None or self.key is None:
            raise FederationError("the coordinator needs its TLS certificate and key",
                                  hint="pass --tls-cert and --tls-key (and --tls-ca), or set federation.serve.tls_* "
                                       "in the config")
        return (self._read(self.ca), self._read(self.certificate), self._read(self.key))

    @staticmethod
    def _read(path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise FederationError(f"a TLS file cannot be read ({exc.strerror or type(exc).__name__})",
                                  hint="check the --tls-* paths (or the config's federation.*.tls_* keys)") from None


@dataclass(frozen=True)
class FederationSettings:
    """What the coordinator decides for every site (sent in each round's configuration)."""

    rounds: int = 3
    min_sites: int = 2
    strategy: Strategy = "fedavg"
    proximal_mu: float = 0.0
    local_epochs: int = 2
    learning_rate: float = 2e-3
    batch_size: int = 32
    seed: int = 0
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    round_timeout_s: float = 600.0
    wait_for_sites_s: float = 600.0
    """After a round's challenges: how long to wait for more sites when fewer than min_sites passed."""
    secure_aggregation: bool = False
    secagg: SecAggParams = field(default_factory=SecAggParams)

    def __post_init__(self) -> None:
        if min(self.rounds, self.min_sites, self.local_epochs, self.batch_size) < 1:
            raise FederationError(f"rounds {self.rounds}, min sites {self.min_sites}, local epochs "
                                  f"{self.local_epochs} and batch size {self.batch_size} must each be at least 1")
        if self.strategy not in STRATEGIES:
            raise FederationError(f"strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.strategy == "fedprox" and self.proximal_mu <= 0:
            raise FederationError("FedProx needs a proximal term mu > 0", hint="e.g. --proximal-mu 0.01")
        if self.secure_aggregation and not 2 <= self.min_sites <= self.secagg.max_sites:
            raise FederationError(f"secure aggregation needs 2 to {self.secagg.max_sites} sites a round, not "
                                  f"--min-sites {self.min_sites}",
                                  hint="one site's aggregate is its own update: use --min-sites 2 or more")


@dataclass(frozen=True)
class RoundStats:
    round: int
    sites: int
    failures: int
    aggregated: bool
    bytes_per_site: tuple[int, ...]
    round_time_s: float
    loss: float | None
    refused: tuple[str, ...] = ()
    """Fingerprints (short) of the site keys refused in this round."""
    recovered: int = 0
    """Sites that dropped after the mask keys were exchanged and whose masks were removed."""


def to_parameters(arrays: Sequence[np.ndarray]) -> Any:
    from flwr.common import ndarrays_to_parameters

    return ndarrays_to_parameters(list(arrays))


def from_parameters(parameters: Any) -> list[np.ndarray]:
    from flwr.common import parameters_to_ndarrays

    return list(parameters_to_ndarrays(parameters))




def settings_json(settings: FederationSettings) -> dict[str, Any]:
    """The settings as JSON (the coordinator's report)."""
    out = asdict(settings)
    out["privacy"] = settings.privacy.to_json()
    out["secagg"] = settings.secagg.to_json() if settings.secure_aggregation else None
    return out
