"""Three sites with deliberately different data for federation tests and the benchmark.

Built from the shared real H&E images plus wsiflow's synthetic artefacts: hospital-a is
mostly pen-marked, hospital-b mostly out of focus, hospital-c clean (tissue and glass); each
site lacks one of the four classes, so no site alone learns them all. Each site gets one
generic tiled TIFF (2 µm/px) and a reviewed GeoJSON whose polygons cover its regions; a
held-out set of all four classes comes from other real images. A sentinel string is planted
in every slide (file name, ImageDescription) and annotation file.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image

from models import ClassInfo, ModelManifest, Registry, build_module
from models._artefacts import add_ink, defocus, synthetic_glass
from models._manifest import now_iso
from models._weights import sha256_bytes, state_dict_to_safetensors

__all__ = ["CLASSES", "SENTINEL", "SiteData", "add_base_model", "base_model", "held_out_set", "make_sites", "make_tls"]

CLASSES = ("background", "tissue", "ink", "blur")
SENTINEL = "SENTINEL-7f3a-PATIENT-DOE"
_REGION_PX = 384  # canvas px per region at 2 µm/px; a 64 px tile at 4 µm/px covers 128 of them
_INSET_PX = 64  # polygons stay this far inside a region, so no sampled tile straddles two
_SITE_CLASSES = {"hospital-a": ("tissue", "ink", "ink", "background"),
                 "hospital-b": ("tissue", "blur", "blur", "ink"),
                 "hospital-c": ("tissue", "background", "background", "blur")}
"""Site name -> its regions: mostly pen-marked, mostly blurred, clean; each lacks one class."""


@dataclass(frozen=True)
class SiteData:
    name: str
    slide: Path
    annotations: Path


def _tissue(source: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    y = int(rng.integers(0, source.shape[0] - size + 1))
    x = int(rng.integers(0, source.shape[1] - size + 1))
    return np.ascontiguousarray(source[y:y + size, x:x + size])


def _region(kind: str, source: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    if kind == "background":
        return synthetic_glass(rng, size)
    patch = _tissue(source, rng, size)
    if kind == "blur":
        return defocus(defocus(patch, rng), rng)  # twice: clearly out of focus at 4 µm/px
    if kind == "ink":
        block = 64  # ink in every block, so every sampled tile shows some
        out = patch.copy()
        for by in range(0, size, block):
            for bx in range(0, size, block):
                out[by:by + block, bx:bx + block], _ = add_ink(out[by:by + block, bx:bx + block], rng,
                                                               min_coverage=0.25)
        return out
    return patch


def _write_tiff(path: Path, image: np.ndarray, mpp: float) -> None:
    with tifffile.TiffWriter(path) as writer:
        for level in range(2):
            factor = 2**level
            pixels = image if level == 0 else np.asarray(
                Image.fromarray(image).resize((image.shape[1] // factor, image.shape[0] // factor),
                                              Image.Resampling.BOX))
            writer.write(pixels, tile=(128, 128), photometric="rgb", compression="zlib",
                         resolution=(1e4 / (mpp * factor), 1e4 / (mpp * factor)), resolutionunit="CENTIMETER",
                         subfiletype=0 if level == 0 else 1,
                         description=f"scanned by {SENTINEL}" if level == 0 else None)


def make_sites(root: Path, tissue_image: Path, seed: int = 0, names: Sequence[str] | None = None) -> list[SiteData]:
    """One slide and one reviewed annotation file per site under ``root/<site>/`` (only ``names``
    when given: each site's data is the same either way)."""
    source = np.asarray(Image.open(tissue_image).convert("RGB"))
    sites = []
    for k, (name, kinds) in enumerate(_SITE_CLASSES.items()):
        if names is not None and name not in names:
            continue
        rng = np.random.default_rng(seed + k)
        canvas = np.concatenate([_region(kind, source, rng, _REGION_PX) for kind in kinds], axis=1)
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        slide = folder / f"{SENTINEL}-{name}.tiff"
        _write_tiff(slide, canvas, 2.0)
        features = []
        for i, kind in enumerate(kinds):
            x0, x1 = i * _REGION_PX + _INSET_PX, (i + 1) * _REGION_PX - _INSET_PX
            y0, y1 = _INSET_PX, _REGION_PX - _INSET_PX
            ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
            features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                             "properties": {"classification": {"name": kind}, "review": "accept",
                                            "reviewer": SENTINEL, "note": f"{SENTINEL} slide {name}"}})
        annotations = folder / "review.geojson"
        annotations.write_text(json.dumps({"type": "FeatureCollection", "features": features}), encoding="utf-8")
        sites.append(SiteData(name, slide, annotations))
    return sites


def held_out_set(images: list[Path], per_class: int = 24, seed: int = 99) -> tuple[np.ndarray, np.ndarray]:
    """Pooled held-out tiles (64 px at 4 µm/px) of all four classes, from other real images."""
    rng = np.random.default_rng(seed)
    sources = [np.asarray(Image.open(p).convert("RGB")) for p in images]
    tiles, labels = [], []
    for label, kind in enumerate(CLASSES):
        for i in range(per_class):
            source = sources[i % len(sources)]
            region = _region(kind, source, rng, 128)
            tiles.append(np.asarray(Image.fromarray(region).resize((64, 64), Image.Resampling.BOX)))
            labels.append(label)
    return np.stack(tiles), np.array(labels, dtype=np.int64)


def base_model(pretrain_image: Path | None = None, name: str = "fedbase", seed: int = 0) -> tuple[ModelManifest, bytes]:
    """The tiny test architecture with the four classes: its manifest and weights.

    With ``pretrain_image`` it is first trained briefly on tiles made from that (other-stain)
    image, like a vendor's model that the sites then fine-tune; the same bytes go to every site.
    """
    from models import TrainSettings, train_module

    palette = ("#cccccc", "#2ca02c", "#1f3fbf", "#ff7f0e")
    manifest = ModelManifest(
        name=name, version=1, timm_name="test_efficientnet",
        classes=tuple(ClassInfo(c, palette[i]) for i, c in enumerate(CLASSES)),
        tile_size_px=64, target_mpp=4.0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
        weights_file="weights.safetensors", weights_sha256="0" * 64, intended_use="tests only",
        created_at=now_iso(),
    )
    torch.manual_seed(seed)
    module = build_module(manifest)
    if pretrain_image is not None:
        images, labels = held_out_set([pretrain_image], per_class=16, seed=seed + 7)
        train_module(module, images, labels, manifest.preprocessing,
                     TrainSettings(epochs=3, batch_size=8, learning_rate=3e-3, seed=seed, progress=False))
    weights = state_dict_to_safetensors(module.state_dict())
    return replace(manifest, weights_sha256=sha256_bytes(weights)), weights


def add_base_model(registry: Registry, base: tuple[ModelManifest, bytes] | None = None) -> ModelManifest:
    """Store ``base`` (default: the untrained tiny model) in ``registry``."""
    manifest, weights = base or base_model()
    registry.add(manifest, weights)
    return manifest


def make_tls(folder: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a coordinator certificate for 127.0.0.1/localhost: (ca, cert, key) PEMs."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wsiflow test federation CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = (folder / "ca.pem", folder / "server.pem", folder / "server.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths
