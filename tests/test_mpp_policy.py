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


def test_cli_value_is_ignored_for_valid_metadata_and_says_so():
    """A slide with a valid µm/px is never measured at another scale by accident."""
    r = _resolve((0.5, 0.5), MppPolicy(cli_mpp=(0.25, 0.25)))
    assert (r.mpp_x, r.mpp_y, r.source, r.override, r.declined) == (0.5, 0.5, "metadata", None, "--mpp")
    assert not r.is_override
    assert r.to_json()["declined"] == "--mpp"
    assert "--mpp not applied" in r.describe() and "--mpp-force" in r.describe()


def test_cli_value_with_force_replaces_valid_metadata_and_is_recorded_with_it():
    r = _resolve((0.5, 0.5), MppPolicy(cli_mpp=(0.25, 0.25), force=True))
    assert (r.mpp_x, r.mpp_y, r.source, r.override) == (0.25, 0.25, "cli", "--mpp-force")
    assert (r.metadata_mpp_x, r.metadata_mpp_y, r.declined) == (0.5, 0.5, None)
    assert r.is_override
    assert "OVERRIDE --mpp-force" in r.describe() and "metadata said 0.5 x 0.5" in r.describe()


@pytest.mark.parametrize("meta", [(None, None), (0.25, None), (352.8, 352.8), (float("nan"), 0.25)])
@pytest.mark.parametrize("force", [False, True])
def test_cli_value_applies_when_metadata_is_missing_or_implausible(meta, force):
    r = _resolve(meta, MppPolicy(cli_mpp=(0.3, 0.31), force=force))
    assert (r.mpp_x, r.mpp_y, r.source, r.declined) == (0.3, 0.31, "cli", None)
    assert r.override == "--mpp"  # applied because the metadata lacks it: forcing changed nothing
    assert r.is_override and "OVERRIDE --mpp" in r.describe()
    assert [str(v) for v in (r.metadata_mpp_x, r.metadata_mpp_y)] == [str(v) for v in meta]  # recorded as given


def test_cli_value_beats_config_overrides_when_metadata_is_missing():
    policy = MppPolicy(cli_mpp=(0.3, 0.3), overrides=(MppOverride(0.4, 0.4, label="a", vendor="aperio"),))
    assert (_resolve((None, None), policy).mpp_x, _resolve((None, None), policy).override) == (0.3, "--mpp")


def test_force_without_a_value_is_refused():
    with pytest.raises(ConfigError, match="--mpp-force"):
        MppPolicy(force=True)


def test_fixed_policy_always_uses_its_value():
    """For workers: a scale already resolved (and recorded) by the client is used as is."""
    r = _resolve((0.5, 0.5), MppPolicy.fixed(0.25, 0.26))
    assert (r.mpp_x, r.mpp_y, r.source) == (0.25, 0.26, "cli")
    assert _resolve((None, None), MppPolicy.fixed(0.25, 0.26)).mpp_x == 0.25


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


def test_config_override_without_force_keeps_valid_metadata_and_says_so():
    policy = MppPolicy(overrides=(MppOverride(0.3, 0.3, label="a", vendor="aperio"),))
    kept = _resolve((0.5, 0.5), policy)
    assert (kept.mpp_x, kept.source, kept.override, kept.declined) == (0.5, "metadata", None, "mpp_overrides[a]")
    missing = _resolve((None, None), policy)
    assert (missing.mpp_x, missing.source, missing.override) == (0.3, "config", "mpp_overrides[a]")


def test_config_override_with_force_replaces_valid_metadata():
    policy = MppPolicy(overrides=(MppOverride(0.3, 0.3, label="a", vendor="aperio", force=True),))
    r = _resolve((0.5, 0.5), policy)
    assert (r.mpp_x, r.source, r.override, r.metadata_mpp_x, r.declined) == (0.3, "config", "mpp_overrides[a]", 0.5, None)
    assert r.is_override
    # A forced folder override still beats a (forced) vendor override.
    both = MppPolicy(overrides=(
        MppOverride(0.3, 0.3, label="vendor", vendor="aperio", force=True),
        MppOverride(0.4, 0.4, label="frozen", folder=Path("/data/frozen"), force=True),
    ))
    assert _resolve((0.5, 0.5), both).override == "mpp_overrides[frozen]"


def test_a_declined_cli_value_is_reported_before_a_declined_config_override():
    policy = MppPolicy(cli_mpp=(0.25, 0.25), overrides=(MppOverride(0.3, 0.3, label="a", vendor="aperio"),))
    r = _resolve((0.5, 0.5), policy)
    assert (r.source, r.declined) == ("metadata", "--mpp")


def test_a_non_forced_override_is_skipped_for_the_next_one():
    """Valid metadata: an unforced folder override is declined, a forced vendor one applies."""
    policy = MppPolicy(overrides=(
        MppOverride(0.4, 0.4, label="frozen", folder=Path("/data/frozen")),
        MppOverride(0.3, 0.3, label="vendor", vendor="aperio", force=True),
    ))
    assert _resolve((0.5, 0.5), policy).override == "mpp_overrides[vendor]"


@pytest.mark.parametrize("value", [0.0, -1.0, 51.0, float("inf")])
def test_user_supplied_values_are_checked(value):
    with pytest.raises(ConfigError):
        MppPolicy(cli_mpp=(value, value))
    with pytest.raises(ConfigError):
        MppOverride(value, value, label="x", vendor="aperio")


def test_an_override_must_match_something():
    with pytest.raises(ConfigError, match="matches nothing"):
        MppOverride(0.25, 0.25, label="x")
