import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cam2mask_lib.data import DataError, parse_rle, rle_decode, rle_encode

KAGGLE_ROW = "29102 12 29346 24 29602 24 29858 24"  # train.csv, 0002cc93b.jpg, class 1


def test_known_kaggle_row_decodes_to_exact_pixels():
    m = rle_decode(KAGGLE_ROW, (256, 1600))
    assert m.shape == (256, 1600) and m.dtype == np.uint8
    expected = np.zeros((256, 1600), np.uint8)
    # pixel p (1-based) is column (p-1)//256, row (p-1)%256
    expected[173:185, 113] = 1   # 29102..29113
    expected[161:185, 114] = 1   # 29346..29369
    expected[161:185, 115] = 1   # 29602..29625
    expected[161:185, 116] = 1   # 29858..29881
    assert np.array_equal(m, expected)
    assert m.sum() == 12 + 24 * 3
    assert rle_encode(m) == KAGGLE_ROW


def test_run_continues_into_next_column():
    m = rle_decode("3 4", (3, 2))  # pixels 3,4,5,6 of a 3x2 image: (2,0), (0,1), (1,1), (2,1)
    assert m.tolist() == [[0, 1], [0, 1], [1, 1]]


def test_empty_mask_encodes_to_empty_string():
    assert rle_encode(np.zeros((4, 5), np.uint8)) == ""
    for empty in ("", None, float("nan"), "   "):
        assert rle_decode(empty, (4, 5)).sum() == 0


@settings(max_examples=150, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 20), st.integers(1, 20)),
              elements=st.integers(0, 1)))
def test_round_trip(mask):
    rle = rle_encode(mask)
    assert np.array_equal(rle_decode(rle, mask.shape), mask)
    assert rle_encode(rle_decode(rle, mask.shape)) == rle


@settings(max_examples=50, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 12), st.integers(1, 12)),
              elements=st.integers(0, 255)))
def test_nonzero_is_foreground(mask):
    assert np.array_equal(rle_decode(rle_encode(mask), mask.shape), (mask != 0).astype(np.uint8))


@pytest.mark.parametrize("rle, message", [
    ("1 2 3", "even count"),
    ("1 x", "not an integer"),
    ("1.5 2", "not an integer"),
    ("0 3", "1-based"),
    ("5 0", "length 0"),
    ("5 -2", "length -2"),
    ("10 3 4 2", "is not after"),
    ("1 5 3 2", "overlaps"),
    ("19 3", "past the image end"),
])
def test_malformed_rle_is_rejected_with_reason(rle, message):
    with pytest.raises(DataError, match=message):
        parse_rle(rle, 20)


def test_adjacent_runs_are_allowed():
    assert rle_decode("1 2 3 2", (2, 2)).sum() == 4
