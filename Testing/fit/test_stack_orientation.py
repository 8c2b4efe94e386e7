"""Stacks turned far apart: the stacks' vote on where the atlas lies, and the stack registration that
is redone from it (fit/stack_orientation.py, fit/registration.prealign)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy.spatial.transform import Rotation
from testkit import rigid

from GaussianSVRLib.atlas.orientations import angle_deg
from GaussianSVRLib.fit import registration
from GaussianSVRLib.fit.registration import prealign
from GaussianSVRLib.fit.stack_orientation import CLUSTER_DEG, largest_group
from GaussianSVRLib.geometry import rotvec_to_matrix_np
from GaussianSVRLib.io.slices import extract_slices
from GaussianSVRLib.io.stacks import read_stacks

#: The turn of one stack: far outside what a registration from the headers can undo.
TURN = Rotation.from_rotvec(np.radians(100.0) * np.array([0.6, 0.0, 0.8])).as_matrix()
#: How close the recovered orientation must be (the simulated slices move by up to 2 degrees).
TOLERANCE_DEG = 8.0


def about(axis: str, degrees: float) -> np.ndarray:
    return Rotation.from_euler(axis, degrees, degrees=True).as_matrix()


def test_the_largest_group_is_a_majority_of_agreeing_orientations():
    close = {0: np.eye(3), 1: about("x", 12), 2: about("y", -15), 3: about("z", 90)}
    assert largest_group(close) == {0, 1, 2}
    assert largest_group({0: np.eye(3), 1: about("z", 90)}) == set()
    assert largest_group({0: np.eye(3), 1: about("z", 90), 2: about("x", 90), 3: about("x", 5)}) == set()
    assert largest_group({0: np.eye(3), 1: about("x", CLUSTER_DEG - 1)}) == {0, 1}


@pytest.fixture(scope="module")
def stacks(phantom_stacks):
    return read_stacks(phantom_stacks.stack_paths, phantom_stacks.mask_paths)


@pytest.fixture(scope="module")
def turned_stacks(stacks):
    """The phantom's three stacks, the second one's world positions turned by TURN about its centre
    (the fetus turned between the acquisitions), and that rigid map (4, 4)."""
    moving = stacks[1]
    centre = moving.affine[:3, :3] @ (np.array(moving.mask.shape[::-1]) / 2.0) + moving.affine[:3, 3]
    turn = rigid(TURN, centre, np.array([6.0, -4.0, 3.0]))
    return [stacks[0], replace(moving, affine=turn @ moving.affine), stacks[2]], turn


def stack_rotations(stacks, atlas_search: bool) -> list[np.ndarray]:
    """The rotation (3, 3) prealign gives each stack's slices (a stack's slices share one)."""
    slices = extract_slices(stacks)
    rotvec, _ = prealign(stacks, slices, 0, atlas_search=atlas_search)
    return [rotvec_to_matrix_np(rotvec[slices.slice_stack == s][0]) for s in range(len(stacks))]


def test_a_stack_turned_far_registers_only_with_the_vote(turned_stacks):
    stacks, turn = turned_stacks
    truth = turn[:3, :3].T
    assert angle_deg(stack_rotations(stacks, atlas_search=False)[1], truth) > CLUSTER_DEG
    assert angle_deg(stack_rotations(stacks, atlas_search=True)[1], truth) < TOLERANCE_DEG


def test_stacks_that_agree_keep_their_registration(stacks):
    for kept, alone in zip(stack_rotations(stacks, True), stack_rotations(stacks, False), strict=True):
        assert angle_deg(kept, alone) < 1.0


def test_a_stack_whose_own_atlas_fit_is_wrong_keeps_its_registration(stacks, monkeypatch):
    """The stack is outside the group because its fit is 120 degrees off, not its registration: the
    registration redone from that fit starts far off, and the stacks' correlation rejects it."""
    orient = registration.orient

    def wrong_for_the_last(volume, mask, affine, atlas):
        found = orient(volume, mask, affine, atlas)
        if mask is stacks[2].mask:
            return replace(found, fit=replace(found.fit, rotation=about("y", 120) @ found.fit.rotation))
        return found

    monkeypatch.setattr(registration, "orient", wrong_for_the_last)
    alone = stack_rotations(stacks, False)[2]
    assert angle_deg(stack_rotations(stacks, True)[2], alone) < 1.0
