"""``Classifier.classify_study``: what the DICOM node calls for each series, on real files."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from medclass.inference import Classifier


def test_a_study_skips_unreadable_images_with_reasons_and_aggregates_the_rest(trained, tmp_path):
    clf = Classifier(trained / "model.pt", device="cpu")
    good = [get_testdata_file("MR_small.dcm"), get_testdata_file("CT_small.dcm")]
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"DICM but not really" * 20)

    res = clf.classify_study([good[0], broken, good[1]])

    assert res.used == [0, 2] and list(res.skipped) == [1]
    assert "broken.dcm" in res.skipped[1]
    each = np.array([[p.probabilities[c] for c in clf.classes] for p in clf.predict_paths(good)])
    np.testing.assert_allclose(res.image_probabilities, each, atol=1e-5)
    expected = clf.aggregate(res.image_probabilities)
    assert list(res.probabilities) == clf.classes
    assert [res.probabilities[c] for c in clf.classes] == pytest.approx(list(expected), abs=1e-6)
    assert res.label == clf.task.label_names(expected)


def test_a_study_with_nothing_readable_says_why_for_each_image(trained, tmp_path):
    clf = Classifier(trained / "model.pt", device="cpu")
    paths = [tmp_path / "a.dcm", tmp_path / "b.jpg"]
    for p in paths:
        p.write_bytes(b"not an image")
    res = clf.classify_study(paths)
    assert res.used == [] and res.probabilities == {} and set(res.skipped) == {0, 1}
