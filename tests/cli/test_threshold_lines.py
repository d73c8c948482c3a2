"""The thresholds line `tlpipe run` prints after registering, and its low-coverage warning."""

from cli.next_steps import threshold_lines


def test_thresholds_line_and_warning_when_the_classifier_answers_few_images():
    cal = {"target_precision": 0.9, "oof_coverage": 0.31,
           "test": {"classifier_rate": 0.28, "classifier_precision": 0.93, "abstain_rate": 0.55}}
    lines = threshold_lines(cal)
    assert lines[0] == ("thresholds: the classifier answers 31 % of held-out images at the 90 % precision "
                        "target (out of fold); on the test split it answered 28 % at 93 % precision, "
                        "abstained on 55 %")
    assert len(lines) == 2 and "answers only 28 % of images" in lines[1] and "--target-precision" in lines[1]


def test_no_warning_when_most_images_are_answered_and_nothing_without_calibration():
    cal = {"target_precision": 0.9, "oof_coverage": 0.82,
           "test": {"classifier_rate": 0.8, "classifier_precision": 0.95, "abstain_rate": 0.05}}
    assert len(threshold_lines(cal)) == 1
    assert threshold_lines(None) == [] and threshold_lines({}) == []
    assert "n/a" in threshold_lines({"target_precision": 0.9})[0]  # no test split scored
