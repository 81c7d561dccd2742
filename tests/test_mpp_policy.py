from pathlib import Path

import pytest

from pipeline import ConfigError, MissingMppError, MppOverride, MppPolicy, resolve_mpp

SLIDE = Path("/data/frozen/2024/case.svs")


def _resolve(meta, policy=None, vendor="aperio", power=None, path=SLIDE):
    return resolve_mpp(meta, slide_path=path, vendor=vendor, objective_power=power, policy=policy or MppPolicy())


def test_metadata_is_used_when_plausible():
    r = _resolve((0.2527, 0.2529))
    assert (r.mpp_x, r.mpp_y, r.source, r.override) == (0.2527, 0.2529, "metadata", None)
    assert not r.is_override


@pytest.mark.parametrize("meta", [(None, None), (0.25, None), (352.8, 352.8), (0.001, 0.001), (float("nan"), 0.25)])
def test_absent_or_implausible_metadata_is_refused(meta):
    with pytest.raises(MissingMppError) as info:
        _resolve(meta)
    assert "--mpp" in info.value.one_line() and "mpp_overrides" in info.value.one_line()


def test_objective_power_is_never_turned_into_an_mpp():
    with pytest.raises(MissingMppError, match="40x is not used"):
        _resolve((None, None), power=40)


def test_cli_value_wins_and_is_recorded_with_the_metadata():
    r = _resolve((0.5, 0.5), MppPolicy(cli_mpp=(0.25, 0.25)))
    assert (r.mpp_x, r.source, r.override, r.metadata_mpp_x) == (0.25, "cli", "--mpp", 0.5)
    assert r.is_override


def test_folder_override_beats_vendor_override_and_records_its_label_not_the_path():
    policy = MppPolicy(
        overrides=(
            MppOverride(0.3, 0.3, label="aperio-fix", vendor="Aperio"),
            MppOverride(0.4, 0.4, label="frozen", folder=Path("/data/frozen")),
        )
    )
    r = _resolve((None, None), policy)
    assert (r.mpp_x, r.source, r.override) == (0.4, "config", "mpp_overrides[frozen]")
    assert "/data" not in str(r.to_json())
    r = _resolve((None, None), policy, path=Path("/data/other/case.svs"))
    assert (r.mpp_x, r.override) == (0.3, "mpp_overrides[aperio-fix]")
    with pytest.raises(MissingMppError):
        _resolve((None, None), policy, vendor="hamamatsu", path=Path("/elsewhere/x.ndpi"))


def test_only_if_missing_keeps_good_metadata():
    policy = MppPolicy(overrides=(MppOverride(0.3, 0.3, label="a", vendor="aperio", only_if_missing=True),))
    assert _resolve((0.5, 0.5), policy).source == "metadata"
    assert _resolve((None, None), policy).mpp_x == 0.3


@pytest.mark.parametrize("value", [0.0, -1.0, 51.0, float("inf")])
def test_user_supplied_values_are_checked(value):
    with pytest.raises(ConfigError):
        MppPolicy(cli_mpp=(value, value))
    with pytest.raises(ConfigError):
        MppOverride(value, value, label="x", vendor="aperio")


def test_an_override_must_match_something():
    with pytest.raises(ConfigError, match="matches nothing"):
        MppOverride(0.25, 0.25, label="x")
