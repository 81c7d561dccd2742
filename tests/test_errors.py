import pytest

import pipeline
from pipeline import (
    ConfigError,
    CorruptSlideError,
    MissingMppError,
    SlideNotFoundError,
    SlidePermissionError,
    UnsupportedSlideError,
    WsiflowError,
)


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (SlideNotFoundError, FileNotFoundError),
        (SlidePermissionError, PermissionError),
        (UnsupportedSlideError, ValueError),
        (CorruptSlideError, OSError),
        (MissingMppError, ValueError),
        (ConfigError, ValueError),
    ],
)
def test_every_leaf_is_a_wsiflow_error_and_the_fitting_builtin(cls, builtin):
    error = cls("something is wrong")
    assert isinstance(error, WsiflowError)
    assert isinstance(error, builtin)
    assert str(error) == "something is wrong"
    with pytest.raises(builtin):
        raise error


def test_kinds_are_distinct_and_have_a_hint():
    leaves = [SlideNotFoundError, SlidePermissionError, UnsupportedSlideError, CorruptSlideError, MissingMppError, ConfigError]
    assert len({c.kind for c in leaves}) == len(leaves)
    assert all(c.hint for c in leaves)


def test_one_line_has_kind_message_and_hint_without_newlines():
    line = MissingMppError("no µm/px\nin metadata").one_line()
    assert "\n" not in line
    assert line.startswith("missing-mpp: no µm/px in metadata")
    assert "--mpp" in line


def test_public_api_is_explicit():
    for name in pipeline.__all__:
        assert hasattr(pipeline, name), name
