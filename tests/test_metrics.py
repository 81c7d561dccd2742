import numpy as np
import pytest

from models import classification_metrics, expected_calibration_error


def test_metrics_on_a_constructed_case():
    # 4 of class a (3 right), 2 of class b (both right), 2 of class c (none right -> predicted a).
    truth = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 0, 0, 1, 1, 1, 0, 0])
    probabilities = np.full((8, 3), 0.1)
    probabilities[np.arange(8), predicted] = 0.8
    m = classification_metrics(truth, probabilities, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 1 + 0) / 3)
    assert m["confusion_matrix"] == [[3, 1, 0], [0, 2, 0], [2, 0, 0]]
    a = m["per_class"]["a"]
    assert (a["precision"], a["recall"]) == pytest.approx((3 / 5, 3 / 4))
    assert a["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["c"]["f1"] == 0
    # All confidences are 0.8 and accuracy is 5/8: ECE = |0.625 - 0.8|.
    assert m["ece"] == pytest.approx(0.175)


def test_perfectly_calibrated_model_has_zero_ece():
    truth = np.array([0, 0, 0, 1])
    probabilities = np.array([[0.75, 0.25]] * 4)
    assert expected_calibration_error(truth, probabilities) == pytest.approx(0.0)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        classification_metrics(np.array([0, 1]), np.zeros((2, 3)), ["a", "b"])
