"""Sizing rules that are functions of the shape (d2sm_ext/sizing.py), checked on CPU."""
import pytest

from d2sm_ext import sizing

H100_SMS = 132


def test_row_splits_fill_the_gpu_for_the_queue_shape():
    """q = 2^20 rows, d = 1280: the weighted column sums have 10 column blocks and the gradient
    GEMM 2×20 (row, column) blocks at N = 256; split over the rows, both reach 4 programs/SM."""
    q, d, n = 2 ** 20, 1280, 256
    colsum = sizing.row_splits(q, 10, H100_SMS, d, sizing.ROW_SPLIT_MIN_ROWS)
    assert colsum == 53 and 10 * colsum >= 4 * H100_SMS
    assert q / colsum >= sizing.ROW_SPLIT_MIN_ROWS
    grad = sizing.row_splits(q + n, 2 * 20, H100_SMS, n * d, sizing.ROW_SPLIT_MIN_ROWS)
    assert grad == 14 and 40 * grad >= 4 * H100_SMS


@pytest.mark.parametrize("rows,programs,out,expect", [
    (1000, 10, 1280, 1),            # fewer rows than one split's minimum: no split
    (2 ** 20, 2000, 1280, 1),       # the other axes already fill the GPU
    (8192, 1, 1280, 4),             # bounded by the rows per split (2048)
    (2 ** 24, 1, 2 ** 26, 1),       # bounded by the partials' memory (256 MiB / 256 MiB of fp32)
    (2 ** 24, 1, 2 ** 24, 4),       # 4 partials of 64 MiB
])
def test_row_splits_as_a_function_of_the_shape(rows, programs, out, expect):
    assert sizing.row_splits(rows, programs, H100_SMS, out, 2048) == expect


def test_row_splits_under_the_interpreter_exercise_the_reduction():
    assert sizing.row_splits(100, 1, None, 8, 32) == 2
    assert sizing.row_splits(20, 1, None, 8, 32) == 1
