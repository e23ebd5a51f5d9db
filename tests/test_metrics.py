"""ACC, BWT, normalized ACC and the accuracy-matrix CSV on hand-computed matrices."""

import pytest

from otmf_exp.reporting import metrics

# hand-made 3-task matrix: a[j][i] after step j on task i
A = [
    [90.0, None, None],
    [80.0, 85.0, None],
    [70.0, 75.0, 95.0],
]


def test_acc_is_mean_of_final_row():
    assert metrics.acc(A) == pytest.approx((70 + 75 + 95) / 3)


def test_bwt_by_hand():
    # ((70-90) + (75-85)) / 2 = -15
    assert metrics.bwt(A) == pytest.approx(-15.0)


def test_bwt_undefined_for_single_task_and_joint_row():
    assert metrics.bwt([[50.0]]) is None
    assert metrics.bwt([[70.0, 75.0, 95.0]]) is None


def test_normalized_acc_by_hand():
    ind = [100.0, 75.0, 95.0]
    # (0.7 + 1.0 + 1.0) / 3 * 100 = 90
    assert metrics.normalized_acc(A, ind) == pytest.approx(90.0)


def test_incomplete_final_row_rejected():
    with pytest.raises(ValueError):
        metrics.acc([[1.0, None]])


def test_matrix_csv_layout():
    csv = metrics.matrix_csv(A, ["a", "b", "c"]).splitlines()
    assert csv[0] == "step,a,b,c"
    assert csv[1] == "1,90.0000,,"
    assert csv[3] == "3,70.0000,75.0000,95.0000"
