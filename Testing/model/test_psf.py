"""The closed-form PSF convolution against numerical convolution, in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from GaussianSVRLib.model import forward
from GaussianSVRLib.model.psf import adjugate_det_sym6, convolved_gaussian, from_sym6, psf_covariance, to_sym6
from GaussianSVRLib.model.rotations import quaternion_to_matrix, rotvec_to_matrix


@pytest.fixture(autouse=True)
def float64():
    """Every tensor of this module in float64; restored afterwards for the other test modules."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def random_covariance(generator: torch.Generator, low: float = 0.6, high: float = 2.5) -> torch.Tensor:
    """A rotated anisotropic covariance (3, 3) with standard deviations in [low, high] mm."""
    rotation = quaternion_to_matrix(torch.randn(4, generator=generator))
    sigma = low + (high - low) * torch.rand(3, generator=generator)
    return rotation @ torch.diag(sigma**2) @ rotation.T


def unit_gaussian(points: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """exp(-0.5 d^T C^-1 d) at points (..., 3)."""
    d = points - mean
    return np.exp(-0.5 * np.einsum("...i,ij,...j->...", d, np.linalg.inv(cov), d))


def numerical_convolution(
    x: np.ndarray,
    means: np.ndarray,
    covs: np.ndarray,
    intensities: np.ndarray,
    psf: np.ndarray,
    step: float = 0.1,
) -> float:
    """(V * phi)(x) by a Riemann sum over a box of +-6 PSF standard deviations around x."""
    eigval, eigvec = np.linalg.eigh(psf)
    extent = 6.0 * np.sqrt(eigval)
    axes = [np.arange(-e, e + step / 2, step) for e in extent]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1) @ eigvec.T
    phi = unit_gaussian(grid, np.zeros(3), psf)
    phi /= phi.sum()
    volume = sum(
        c * unit_gaussian(x - grid, m, cv) for m, cv, c in zip(means, covs, intensities, strict=True)
    )
    return float((volume * phi).sum())


def test_sym6_round_trip_and_inverse():
    generator = torch.Generator().manual_seed(0)
    cov = torch.stack([random_covariance(generator) for _ in range(5)])
    sym = to_sym6(cov)
    assert torch.allclose(from_sym6(sym), cov)
    adj, det = adjugate_det_sym6(sym)
    assert torch.allclose(det, torch.linalg.det(cov))
    assert torch.allclose(from_sym6(adj) / det[:, None, None], torch.linalg.inv(cov))


def test_psf_covariance_follows_slice_axes_and_motion():
    axes = rotvec_to_matrix(torch.tensor([[0.3, -0.2, 0.5]]))
    rotation = rotvec_to_matrix(torch.tensor([[0.0, 0.1, -0.05]]))
    sigma = torch.tensor([[0.4, 0.5, 1.3]])
    cov = psf_covariance(axes, sigma, rotation)[0]
    normal = (rotation @ axes)[0, :, 2]
    assert torch.allclose(normal @ cov @ normal, sigma[0, 2] ** 2)
    assert torch.allclose(torch.linalg.eigvalsh(cov), torch.sort(sigma[0] ** 2).values)


@pytest.mark.parametrize("seed", [0, 1])
def test_one_gaussian_matches_numerical_convolution(seed):
    generator = torch.Generator().manual_seed(seed)
    cov = random_covariance(generator)
    psf = psf_covariance(
        rotvec_to_matrix(torch.randn(1, 3, generator=generator)),
        torch.tensor([[0.45, 0.45, 1.2]]),
        torch.eye(3)[None],
    )[0]
    mean = torch.zeros(3)
    for x in (torch.zeros(3), torch.tensor([0.8, -0.5, 1.1]), torch.tensor([-2.0, 1.0, 0.3])):
        closed = convolved_gaussian(x - mean, to_sym6(cov), torch.linalg.det(cov), to_sym6(psf))
        numeric = numerical_convolution(
            x.numpy(), mean.numpy()[None], cov.numpy()[None], np.ones(1), psf.numpy()
        )
        assert float(closed) == pytest.approx(numeric, rel=2e-3, abs=1e-6)


def test_mixture_exact_matches_numerical_and_normalized_does_not():
    generator = torch.Generator().manual_seed(5)
    n = 4
    means = torch.randn(n, 3, generator=generator) * 1.5
    covs = torch.stack([random_covariance(generator, 0.5, 1.5) for _ in range(n)])
    intensities = torch.rand(n, generator=generator) + 0.5
    psf = psf_covariance(torch.eye(3)[None], torch.tensor([[0.5, 0.5, 1.3]]), torch.eye(3)[None])[0]
    points = torch.randn(6, 3, generator=generator)
    neighbours = torch.arange(n).expand(len(points), n)
    args = (
        points,
        neighbours,
        means,
        to_sym6(covs),
        torch.linalg.det(covs),
        intensities,
        to_sym6(psf)[None].expand(len(points), 6),
    )
    exact = forward.evaluate(*args, mode="exact")
    normalized = forward.evaluate(*args, mode="normalized")
    numeric = torch.tensor(
        [
            numerical_convolution(p.numpy(), means.numpy(), covs.numpy(), intensities.numpy(), psf.numpy())
            for p in points
        ]
    )
    assert torch.allclose(exact, numeric, rtol=3e-3, atol=1e-5)
    assert (normalized - numeric).abs().max() > 10 * (exact - numeric).abs().max()


def test_forward_matches_brute_force_over_all_gaussians():
    generator = torch.Generator().manual_seed(2)
    n, b = 60, 25
    means = torch.rand(n, 3, generator=generator) * 10
    covs = torch.stack([random_covariance(generator, 0.3, 1.0) for _ in range(n)])
    intensities = torch.rand(n, generator=generator)
    points = torch.rand(b, 3, generator=generator) * 10
    psf = torch.stack(
        [
            psf_covariance(
                rotvec_to_matrix(torch.randn(1, 3, generator=generator)),
                torch.tensor([[0.4, 0.4, 1.0]]),
                torch.eye(3)[None],
            )[0]
            for _ in range(b)
        ]
    )
    reference = forward.brute_force(points, means, covs, intensities, psf)
    everything = torch.arange(n).expand(b, n)
    full = forward.evaluate(
        points, everything, means, to_sym6(covs), torch.linalg.det(covs), intensities, to_sym6(psf)
    )
    assert torch.allclose(full, reference, rtol=1e-10, atol=1e-12)
    distance = torch.cdist(points, means)
    nearest = distance.topk(30, largest=False).indices
    truncated = forward.evaluate(
        points, nearest, means, to_sym6(covs), torch.linalg.det(covs), intensities, to_sym6(psf)
    )
    assert torch.allclose(truncated, reference, rtol=1e-2, atol=1e-3)
    few = forward.evaluate(
        points, nearest[:, :2], means, to_sym6(covs), torch.linalg.det(covs), intensities, to_sym6(psf)
    )
    assert (few - reference).abs().max() > (truncated - reference).abs().max()


def test_no_psf_is_the_volume_itself():
    generator = torch.Generator().manual_seed(3)
    cov = random_covariance(generator)
    x = torch.tensor([0.7, 0.2, -0.4])
    value = convolved_gaussian(x, to_sym6(cov), torch.linalg.det(cov), torch.zeros(6))
    assert float(value) == pytest.approx(float(unit_gaussian(x.numpy(), np.zeros(3), cov.numpy())), rel=1e-12)
