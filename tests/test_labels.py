import numpy as np
import pytest

from paynekit.errors import InputError
from paynekit.labels import APOGEE_LABEL_NAMES, LabelSpace, apogee_label_space


def test_scale_maps_box_to_half_unit_and_back(rng):
    ls = LabelSpace(("teff", "logg"), [3000.0, 0.0], [7000.0, 5.0])
    np.testing.assert_allclose(ls.scale([[3000.0, 0.0], [7000.0, 5.0]]), [[-0.5, -0.5], [0.5, 0.5]])
    x = rng.uniform([3000, 0], [7000, 5], (100, 2))
    np.testing.assert_allclose(ls.unscale(ls.scale(x)), x, rtol=1e-13)
    assert ls.units == ("K", "dex")


def test_scale_keeps_float32():
    ls = LabelSpace(("a",), [0.0], [2.0])
    assert ls.scale(np.ones((3, 1), np.float32)).dtype == np.float32


def test_label_space_validates():
    with pytest.raises(InputError, match="x_max must exceed x_min"):
        LabelSpace(("a", "b"), [0.0, 1.0], [1.0, 1.0])
    with pytest.raises(InputError, match="unique"):
        LabelSpace(("a", "a"), [0.0, 0.0], [1.0, 1.0])
    with pytest.raises(InputError, match="unknown label 'zz'"):
        LabelSpace(("a",), [0.0], [1.0]).index("zz")


def test_apogee_space_has_payne_labels():
    ls = apogee_label_space()
    assert len(ls) == 25 and ls.names == APOGEE_LABEL_NAMES
    assert ls.names[0] == "teff" and ls.names[-1] == "c12_c13"


def test_from_training_labels(rng):
    x = rng.normal(size=(50, 3))
    ls = LabelSpace.from_training_labels(("a", "b", "c"), x)
    s = ls.scale(x)
    np.testing.assert_allclose(s.min(0), -0.5)
    np.testing.assert_allclose(s.max(0), 0.5)
