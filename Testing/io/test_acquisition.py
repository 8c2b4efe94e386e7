"""The acquisition order of a stack's slices: the interleaved default and its variants, SliceTiming
from a real BIDS sidecar (a broken one ignored with a warning), and the pairs of slices acquired one
after the other."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from GaussianSVRLib.io.acquisition import acquisition_ranks, default_order, time_pairs
from GaussianSVRLib.io.stacks import read_stack


def test_the_interleaved_order_takes_every_other_slice_first():
    # Slices 1, 3, 5, 7 then 2, 4, 6 in the 1-based words of a protocol.
    np.testing.assert_array_equal(np.argsort(default_order(7, "interleaved", 2)), [0, 2, 4, 6, 1, 3, 5])
    np.testing.assert_array_equal(np.argsort(default_order(7, "interleaved", 3)), [0, 3, 6, 1, 4, 2, 5])
    np.testing.assert_array_equal(default_order(4, "ascending", 2), [0, 1, 2, 3])
    np.testing.assert_array_equal(default_order(4, "descending", 2), [3, 2, 1, 0])
    np.testing.assert_array_equal(default_order(5, "interleaved", 1), np.arange(5))


def stack_file(folder: Path, sidecar: dict | None, n_slices: int = 6) -> Path:
    path = folder / "sub-01_T2w.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((n_slices, 8, 8), np.float32)), str(path))
    if sidecar is not None:
        (folder / "sub-01_T2w.json").write_text(json.dumps(sidecar))
    return path


def test_slice_timing_from_the_sidecar_decides_the_order(tmp_path: Path):
    timing = [0.0, 1.2, 0.4, 1.6, 0.8, 2.0]  # 1, 3, 5, 2, 4, 6: interleaved, odd slices first
    stack = read_stack(stack_file(tmp_path, {"SliceTiming": timing, "SliceThickness": 3.0}))
    ranks = acquisition_ranks(stack, "ascending", 2)
    np.testing.assert_array_equal(np.argsort(ranks), [0, 2, 4, 1, 3, 5])


@pytest.mark.parametrize("timing", [[0.0, 1.0], "0 1 2 3 4 5", [0.0, None, 1.0, 2.0, 3.0, 4.0]])
def test_a_sidecar_timing_that_fits_no_stack_is_ignored_with_a_warning(
    tmp_path: Path, timing, caplog: pytest.LogCaptureFixture
):
    stack = read_stack(stack_file(tmp_path, {"SliceTiming": timing}))
    with caplog.at_level(logging.WARNING):
        ranks = acquisition_ranks(stack, "descending", 2)
    np.testing.assert_array_equal(ranks, default_order(6, "descending", 2))
    assert "SliceTiming" in caplog.text and "sub-01_T2w.json" in caplog.text


@pytest.mark.parametrize("sidecar", [None, {"SliceTiming": []}, {"EchoTime": 0.09}])
def test_without_slice_times_the_default_applies_quietly(
    tmp_path: Path, sidecar, caplog: pytest.LogCaptureFixture
):
    """No sidecar, or one without times (the bundled real stacks' sidecars hold an empty list)."""
    stack = read_stack(stack_file(tmp_path, sidecar))
    with caplog.at_level(logging.WARNING):
        ranks = acquisition_ranks(stack, "interleaved", 2)
    np.testing.assert_array_equal(ranks, default_order(6, "interleaved", 2))
    assert "SliceTiming" not in caplog.text


def test_pairs_follow_the_acquisition_within_each_stack_and_skip_empty_slices():
    # Stack 0 has slices k = 0..4 but k = 2 is empty (no slice id); stack 1 has k = 0..2.
    slice_stack = np.array([0, 0, 0, 0, 1, 1, 1])
    slice_k = np.array([0, 1, 3, 4, 0, 1, 2])
    ranks = [default_order(5, "interleaved", 2), default_order(3, "ascending", 2)]
    pairs = time_pairs(slice_stack, slice_k, ranks)
    # Stack 0 in time: k 0, (2), 4, 1, 3 -> ids 0, 3, 1, 2; stack 1: ids 4, 5, 6.
    np.testing.assert_array_equal(pairs, [[0, 3], [3, 1], [1, 2], [4, 5], [5, 6]])
