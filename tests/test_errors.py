"""The one exception tree: every leaf, found by walking ``WsiflowError``'s subclasses.

Nothing here lists the leaves by hand except the builtin each one must also be (a table
that has to cover every leaf), so a new error class without a distinct kind, a hint, a
fitting builtin or a row in README's error table fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import models  # noqa: F401 - registers the model errors in the class tree
import pipeline
import privacy  # noqa: F401 - registers any privacy errors in the class tree
from pipeline import MissingMppError, WsiflowError

PRODUCT_PACKAGES = {"pipeline", "models", "privacy", "flows", "viewer"}
README = Path(__file__).resolve().parents[1] / "README.md"

# The builtin each leaf also inherits, so `except FileNotFoundError` etc. keep working.
FITTING_BUILTIN: dict[str, type[Exception]] = {
    "SlideNotFoundError": FileNotFoundError,
    "SlidePermissionError": PermissionError,
    "UnsupportedSlideError": ValueError,
    "CorruptSlideError": OSError,
    "MissingMppError": ValueError,
    "ConfigError": ValueError,
    "OutputError": OSError,
    "WorkerError": RuntimeError,
    "DeidentificationError": ValueError,
    "NotAResultError": FileNotFoundError,
    "ModelNotFoundError": LookupError,
    "ManifestError": ValueError,
    "WeightsIntegrityError": ValueError,
    "UnsafeWeightsError": ValueError,
    "AcceptanceError": ValueError,
    "ReadOnlyModelError": PermissionError,
    "AuditLogError": ValueError,
    "RegistryIntegrityError": ValueError,
    "UnsignedBundleError": ValueError,
    "UntrustedPublisherError": ValueError,
    "TamperedBundleError": ValueError,
    "DowngradeError": ValueError,
    "ValidationOverlapError": ValueError,
    "FederationPayloadError": ValueError,
    "FederationAuthError": PermissionError,
}


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        if sub.__module__.split(".")[0] in PRODUCT_PACKAGES:  # not classes tests define
            found.append(sub)
            found += _subclasses(sub)
    return found


def _product_subclasses(cls: type) -> list[type]:
    return [c for c in cls.__subclasses__() if c.__module__.split(".")[0] in PRODUCT_PACKAGES]


ALL = _subclasses(WsiflowError)
LEAVES = sorted({c for c in ALL if not _product_subclasses(c)}, key=lambda c: c.__name__)


def test_the_tree_is_found_across_packages():
    packages = {c.__module__.split(".")[0] for c in LEAVES}
    assert {"pipeline", "models"} <= packages, packages
    assert len(LEAVES) >= 17  # the leaves known when this test was written (see FITTING_BUILTIN)


def test_the_builtin_table_covers_exactly_the_leaves():
    names = [c.__name__ for c in LEAVES]
    assert len(set(names)) == len(names), "two leaves share a class name"
    assert set(names) == set(FITTING_BUILTIN), (
        f"missing from FITTING_BUILTIN: {sorted(set(names) - set(FITTING_BUILTIN))}; "
        f"no longer leaves: {sorted(set(FITTING_BUILTIN) - set(names))}"
    )


@pytest.mark.parametrize("cls", LEAVES, ids=lambda c: c.__name__)
def test_every_leaf_is_a_wsiflow_error_and_the_fitting_builtin(cls):
    builtin = FITTING_BUILTIN[cls.__name__]
    error = cls("something is wrong")
    assert isinstance(error, WsiflowError)
    assert isinstance(error, builtin)
    assert str(error) == "something is wrong" and error.message == "something is wrong"
    with pytest.raises(builtin):
        raise error


@pytest.mark.parametrize("cls", LEAVES, ids=lambda c: c.__name__)
def test_every_leaf_is_public_in_its_package(cls):
    package = __import__(cls.__module__.split(".")[0])
    assert cls.__name__ in package.__all__ and getattr(package, cls.__name__) is cls


def test_kinds_are_distinct_and_have_a_hint():
    kinds = [c.kind for c in LEAVES]
    assert len(set(kinds)) == len(kinds), sorted(kinds)
    assert WsiflowError.kind not in kinds  # every leaf names its own kind
    for cls in LEAVES:
        assert re.fullmatch(r"[a-z]+(-[a-z]+)*", cls.kind), cls.kind
        assert cls.hint and cls.hint != WsiflowError.hint, cls.__name__


def test_readme_error_table_has_a_row_for_every_kind():
    text = README.read_text(encoding="utf-8")
    for cls in LEAVES:
        row = re.search(rf"^\| `{re.escape(cls.kind)}` \|(.*)$", text, flags=re.MULTILINE)
        assert row, f"README's error table lacks `{cls.kind}`"
        assert cls.__name__ in row.group(1) and FITTING_BUILTIN[cls.__name__].__name__ in row.group(1), row.group(0)


def test_a_hint_given_at_raise_time_replaces_the_class_hint():
    error = MissingMppError("no µm/px", hint="use 0.25")
    assert error.hint == "use 0.25" and MissingMppError.hint != "use 0.25"


def test_one_line_has_kind_message_and_hint_without_newlines():
    line = MissingMppError("no µm/px\nin metadata").one_line()
    assert "\n" not in line
    assert line.startswith("missing-mpp: no µm/px in metadata")
    assert "--mpp" in line


def test_public_api_is_explicit():
    for name in pipeline.__all__:
        assert hasattr(pipeline, name), name
