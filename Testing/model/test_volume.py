"""The output grid and rendering the Gaussians onto it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from GaussianSVRLib.errors import InputError
from GaussianSVRLib.geometry import apply_affine, rotvec_to_matrix_np
from GaussianSVRLib.model import forward
from GaussianSVRLib.model.volume import check_grid_fits, grid_covering, render


def test_grid_covers_points_in_the_given_direction():
    rng = np.random.default_rng(0)
    points = rng.uniform(-20, 30, (500, 3))
    direction = rotvec_to_matrix_np(np.array([0.2, -0.3, 0.1]))
    affine, shape = grid_covering(points, direction, 0.8, margin=2.0)
    assert np.allclose(affine[:3, :3], direction * 0.8)
    index = apply_affine(np.linalg.inv(affine), points)
    nk, nj, ni = shape
    assert (index >= 2.0 / 0.8 - 1e-6).all()
    assert (index[:, 0] <= ni - 1 - 2.0 / 0.8 + 1).all() and (index[:, 2] <= nk - 1 - 2.0 / 0.8 + 1).all()
    assert nj > 0


def test_a_grid_too_large_for_memory_is_refused_with_the_file_named():
    with pytest.raises(InputError, match="out.nii.gz.*raise --output-resolution"):
        check_grid_fits((100000, 100000, 100000), 0.001, "out.nii.gz")
    check_grid_fits((100, 100, 100), 0.8, "out.nii.gz")


def random_field(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    means = torch.rand(n, 3, generator=generator, dtype=torch.float64) * 10
    scales = 0.5 + torch.rand(n, 3, generator=generator, dtype=torch.float64)
    covariances = torch.diag_embed(scales**2)
    return means, covariances, torch.rand(n, generator=generator, dtype=torch.float64)


def test_render_equals_the_brute_force_mixture_at_every_voxel():
    means, covariances, intensities = random_field(40)
    affine = np.eye(4)
    affine[:3, :3] *= 1.5
    shape = (7, 7, 7)
    volume = render(means, covariances, intensities, affine, shape, k=40)
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    points = torch.as_tensor(apply_affine(affine, np.stack([i, j, k], -1).reshape(-1, 3).astype(float)))
    reference = forward.brute_force(points, means, covariances, intensities).numpy().reshape(shape)
    assert np.allclose(volume, reference, rtol=1e-5, atol=1e-6)


def test_normalized_render_of_a_constant_field_is_that_constant():
    means, covariances, _ = random_field(60, seed=1)
    constant = torch.full((60,), 3.0, dtype=torch.float64)
    affine = np.eye(4)
    affine[:3, 3] = 3.0
    volume = render(means, covariances, constant, affine, (4, 4, 4), k=16, normalized=True)
    assert np.allclose(volume, 3.0, rtol=1e-3)
    exact = render(means, covariances, constant, affine, (4, 4, 4), k=16)
    assert not np.allclose(exact, 3.0, rtol=1e-1)
