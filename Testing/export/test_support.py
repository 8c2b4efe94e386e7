"""The brain the stacks agree on: a vote of their masks, each slice carried by its fitted motion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from GaussianSVRLib.export.support import (
    EDGE_FADE_MM,
    SUPPORT_MARGIN_MM,
    carried_stacks,
    stack_slices,
    voted_brain,
)
from GaussianSVRLib.geometry import apply_affine, matrix_to_rotvec
from GaussianSVRLib.io.slices import extract_slices
from GaussianSVRLib.io.stacks import Stack

SEMI_AXES = np.array([24.0, 14.0, 10.0])
#: Slice axes (columns i, j, k) of three orthogonal stacks.
ORIENTATIONS = [
    np.eye(3),
    np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]]),
    np.array([[0, 0, 1.0], [0, 1, 0], [-1, 0, 0]]),
]


def in_ellipsoid(points: np.ndarray) -> np.ndarray:
    return ((points / SEMI_AXES) ** 2).sum(-1) <= 1.0


def make_stack(direction: np.ndarray, extra=None, shape=(24, 64, 64)) -> Stack:
    """A stack of 1 mm pixels and 3 mm slices centred on the origin, its mask the ellipsoid (or any
    other region ``extra`` adds)."""
    spacing = np.array([1.0, 1.0, 3.0])
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing
    affine[:3, 3] = -(direction * spacing) @ ((np.array(shape[::-1]) - 1) / 2.0)
    k, j, i = np.indices(shape)
    world = apply_affine(affine, np.stack([i, j, k], -1).astype(np.float64))
    mask = in_ellipsoid(world) | (extra(world) if extra is not None else False)
    return Stack("stack.nii.gz", np.where(mask, 1.0, 0.1).astype(np.float32), mask, affine, 3.0)


def grid(spacing: float = 1.0, half: float = 40.0) -> tuple[np.ndarray, tuple[int, int, int], np.ndarray]:
    """An isotropic grid over [-half, half]^3: its affine, shape and voxel centres (nk, nj, ni, 3)."""
    n = int(round(2 * half / spacing)) + 1
    affine = np.eye(4)
    affine[:3, :3] *= spacing
    affine[:3, 3] = -half
    k, j, i = np.indices((n, n, n))
    return affine, (n, n, n), apply_affine(affine, np.stack([i, j, k], -1).astype(np.float64))


def brain_of(
    stacks: list[Stack], rotation: np.ndarray | None = None, shift: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The voted brain when every slice moved by x -> rotation x + shift, and the grid's points."""
    rotation = np.eye(3) if rotation is None else rotation
    slices = extract_slices(stacks)
    m = slices.n_slices
    centres = slices.slice_centre
    # R (p - c) + c + t = R p + shift
    translation = centres @ rotation.T - centres + (np.zeros(3) if shift is None else shift)
    rotvec = np.tile(matrix_to_rotvec(rotation[None])[0], (m, 1))
    affine, shape, points = grid()
    carried = carried_stacks(stacks, slices, rotvec, translation, np.ones(m, bool))
    return voted_brain(affine, shape, carried, torch.device("cpu")), points


def test_the_brain_is_what_most_masks_hold_not_one_generous_stroke():
    blob = lambda world: np.linalg.norm(world - np.array([0.0, 0.0, 18.0]), axis=-1) < 5.0  # noqa: E731
    stacks = [
        make_stack(ORIENTATIONS[0], extra=blob),
        make_stack(ORIENTATIONS[1]),
        make_stack(ORIENTATIONS[2]),
    ]
    brain, points = brain_of(stacks)
    inner = ((points / (SEMI_AXES - 2.5)) ** 2).sum(-1) <= 1.0
    assert brain[inner].all()
    # The blob, held by one mask of three, is left out; so is everything beyond the margin.
    assert not brain[np.linalg.norm(points - np.array([0.0, 0.0, 18.0]), axis=-1) < 3.0].any()
    outer = ((points / (SEMI_AXES + SUPPORT_MARGIN_MM + EDGE_FADE_MM + 2.5)) ** 2).sum(-1) > 1.0
    assert not brain[outer].any()


def near(points: np.ndarray, centre, radius: float = 1.5) -> np.ndarray:
    return np.linalg.norm(points - np.asarray(centre), axis=-1) < radius


def test_the_brain_turns_and_shifts_with_the_slices():
    stacks = [make_stack(direction) for direction in ORIENTATIONS]
    turn = Rotation.from_rotvec([0.0, 0.0, np.radians(40)]).as_matrix()
    brain, points = brain_of(stacks, turn)
    # The long axis (L-R, 24 mm) turned by +40 degrees about S, not by -40.
    along = 20.0 * np.array([np.cos(np.radians(40)), np.sin(np.radians(40)), 0.0])
    assert brain[near(points, along)].all()
    assert not brain[near(points, along * [1, -1, 1])].any()
    brain, points = brain_of(stacks, shift=np.array([8.0, 0.0, 0.0]))
    assert brain[near(points, [30.0, 0.0, 0.0])].all()
    assert not brain[near(points, [-22.0, 0.0, 0.0])].any()


def test_a_slice_the_fit_did_not_hold_moves_as_its_nearest_held_neighbour():
    stack = make_stack(ORIENTATIONS[0])
    slices = extract_slices([stack])
    m = slices.n_slices
    rotvec = np.zeros((m, 3))
    translation = np.arange(m, dtype=np.float64)[:, None] * np.array([1.0, 0.0, 0.0])
    held = np.ones(m, bool)
    held[slices.slice_k == slices.slice_k.min() + 1] = False
    carried = stack_slices(stack, 0, slices, rotvec, translation, held)
    assert carried is not None and len(carried.translations) == stack.n_slices
    dropped = int(slices.slice_k.min() + 1)
    neighbour = np.nonzero(slices.slice_k == dropped - 1)[0][0]
    np.testing.assert_allclose(carried.translations[dropped], translation[neighbour])
    # Slices without masked pixels (beyond the ellipsoid) move as the end slices.
    assert np.allclose(carried.translations[0], translation[np.argmin(slices.slice_k)])
    assert stack_slices(stack, 0, slices, rotvec, translation, np.zeros(m, bool)) is None


def test_a_voxel_no_stack_sees_is_not_brain():
    stacks = [make_stack(direction, shape=(6, 64, 64)) for direction in ORIENTATIONS]
    brain, points = brain_of(stacks)
    # Each stack covers 18 mm across its slices; beyond every stack's slabs nothing is seen.
    assert not brain[np.abs(points).min(-1) > 9.0 + SUPPORT_MARGIN_MM + EDGE_FADE_MM + 0.5].any()
    assert brain[np.linalg.norm(points, axis=-1) < 5.0].all()


@pytest.mark.parametrize("spacing", [0.8, 1.6])
def test_the_margin_is_in_millimetres(spacing):
    stacks = [make_stack(direction) for direction in ORIENTATIONS]
    slices = extract_slices(stacks)
    m = slices.n_slices
    affine, shape, points = grid(spacing)
    carried = carried_stacks(stacks, slices, np.zeros((m, 3)), np.zeros((m, 3)), np.ones(m, bool))
    brain = voted_brain(affine, shape, carried, torch.device("cpu"))
    volume_ml = brain.sum() * spacing**3 / 1000.0
    ellipsoid_ml = 4.0 / 3.0 * np.pi * np.prod(SEMI_AXES) / 1000.0
    grown_ml = 4.0 / 3.0 * np.pi * np.prod(SEMI_AXES + SUPPORT_MARGIN_MM + EDGE_FADE_MM / 2) / 1000.0
    assert ellipsoid_ml * 0.95 < volume_ml < grown_ml * 1.1
    # Along the long (L-R) axis out of the brain the weight falls from 1 to 0, through values between
    # on a grid finer than the fade.
    weights = brain[(np.abs(points[..., 1:]).max(-1) < spacing / 2) & (points[..., 0] > 0)]
    assert weights[0] == 1 and weights[-1] == 0 and np.all(np.diff(weights) <= 0)
    assert ((weights > 0) & (weights < 1)).any() or spacing >= EDGE_FADE_MM
