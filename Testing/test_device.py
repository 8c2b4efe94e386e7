"""The accelerator's code paths: the torch forward model, the neighbour search and a whole run on the
test device, against the fused CPU kernels that the rest of the suite checks.

The test device is GAUSSIANSVR_TEST_DEVICE (default "cpu"; bench/gpu_check.sh sets "cuda"). On the CPU
the fused kernels are switched off (GAUSSIANSVR_KERNEL=torch) for the device's side, so that CI runs
the very branches a CUDA device takes, and every test here can fail without a GPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
import SimpleITK as sitk
import torch
from testkit import random_covariances

from GaussianSVRLib.model import forward
from GaussianSVRLib.model.neighbours import choose_backend, knn
from GaussianSVRLib.model.psf import to_sym6
from GaussianSVRLib.model.rotations import rotvec_to_matrix
from GaussianSVRLib.pipeline import reconstruct
from GaussianSVRLib.qa.metrics import evaluate
from GaussianSVRLib.settings import preset

DEVICE = torch.device(os.environ.get("GAUSSIANSVR_TEST_DEVICE", "cpu"))
GRADIENTS = ("rotations", "offsets", "means", "cov6", "cov_det", "intensities", "psf6")


@contextlib.contextmanager
def as_the_device() -> Iterator[None]:
    """Within the block, compute as the device does: on the CPU, without the fused kernels."""
    if DEVICE.type != "cpu":
        yield
        return
    before = os.environ.get("GAUSSIANSVR_KERNEL")
    os.environ["GAUSSIANSVR_KERNEL"] = "torch"
    try:
        yield
    finally:
        if before is None:
            del os.environ["GAUSSIANSVR_KERNEL"]
        else:
            os.environ["GAUSSIANSVR_KERNEL"] = before


def slice_problem(n_pixels: int = 2000, n_gaussians: int = 300, n_slices: int = 12, k: int = 16) -> dict:
    """float32 inputs of forward.evaluate_slices on the CPU: Gaussians in a 20 mm box, pixels of turned
    slices through it, each pixel's neighbours by brute force."""
    generator = torch.Generator().manual_seed(5)
    means = 20.0 * torch.rand(n_gaussians, 3, generator=generator, dtype=torch.float64)
    cov = random_covariances(n_gaussians, 0.6, 2.0, generator)
    positions = 20.0 * torch.rand(n_pixels, 3, generator=generator, dtype=torch.float64) - 10.0
    slice_id = torch.randint(0, n_slices, (n_pixels,), generator=generator)
    rotations = rotvec_to_matrix(0.3 * torch.randn(n_slices, 3, generator=generator, dtype=torch.float64))
    offsets = 10.0 + 0.5 * torch.randn(n_slices, 3, generator=generator, dtype=torch.float64)
    moved = (rotations[slice_id] @ positions.unsqueeze(-1)).squeeze(-1) + offsets[slice_id]
    neighbours = torch.cdist(moved, means).topk(k, largest=False).indices
    inputs = {
        "positions": positions, "slice_id": slice_id, "rotations": rotations, "offsets": offsets,
        "neighbours": neighbours, "means": means, "cov6": to_sym6(cov), "cov_det": torch.linalg.det(cov),
        "intensities": torch.rand(n_gaussians, generator=generator, dtype=torch.float64),
        "psf6": to_sym6(random_covariances(n_slices, 0.3, 1.3, generator)),
    }  # fmt: skip
    return {name: t.float() if t.is_floating_point() else t for name, t in inputs.items()}


def values_and_gradients(inputs: dict, device: torch.device, mode: str) -> tuple[torch.Tensor, dict]:
    """forward.evaluate_slices on device; values and the gradients of a weighted sum, back on the CPU."""
    leaves = {
        name: t.to(device).requires_grad_(name in GRADIENTS) if t.is_floating_point() else t.to(device)
        for name, t in inputs.items()
    }
    values = forward.evaluate_slices(**leaves, mode=mode)
    weights = torch.linspace(-1.0, 1.0, len(values), device=device)
    grads = torch.autograd.grad((values * weights).sum(), [leaves[name] for name in GRADIENTS])
    return values.detach().cpu(), {name: g.cpu() for name, g in zip(GRADIENTS, grads, strict=True)}


@pytest.mark.parametrize("mode", ["exact", "normalized"])
def test_forward_and_backward_on_the_device_match_the_cpu_kernels(mode: str) -> None:
    inputs = slice_problem()
    reference, reference_grads = values_and_gradients(inputs, torch.device("cpu"), mode)
    with as_the_device():
        values, grads = values_and_gradients(inputs, DEVICE, mode)
    assert reference.abs().max() > 0.1, "the problem must have weight to compare"
    torch.testing.assert_close(values, reference, rtol=1e-4, atol=1e-5)
    for name in GRADIENTS:
        scale = float(reference_grads[name].abs().max())
        # The normalized field has no amplitude factor: the determinant does not enter it.
        assert scale > 0 or (mode == "normalized" and name == "cov_det"), name
        torch.testing.assert_close(grads[name], reference_grads[name], rtol=1e-3, atol=1e-4 * scale + 1e-9)


def test_neighbours_on_the_device_are_the_exact_nearest() -> None:
    generator = torch.Generator().manual_seed(2)
    means = 40.0 * torch.rand(2000, 3, generator=generator)
    points = 40.0 * torch.rand(6000, 3, generator=generator)
    with as_the_device():
        backend = choose_backend(DEVICE)
        found = knn(means.to(DEVICE), points.to(DEVICE), 16, backend)
    assert found.device.type == DEVICE.type and found.shape == (6000, 16)
    distance = torch.cdist(points.double(), means.double())
    kth = distance.topk(16, largest=False).values[:, -1]
    theirs = distance.gather(1, found.cpu()).max(1).values
    assert torch.all(theirs <= kth + 1e-4), backend
    assert torch.all(found.cpu().sort(1).values.diff(1) > 0), "no Gaussian twice"


@pytest.mark.slow
def test_a_run_on_the_device_reconstructs_as_well_as_the_cpu_kernels(phantom, phantom_stacks) -> None:
    """The whole pipeline on the device (the torch forward, its neighbour backend, no numba) gives the
    quality of the CPU run with the fused kernels."""
    truth, mask = phantom
    # What the device changes is the fit: the steps that do not touch it are left out.
    settings = preset("standard").updated(
        iterations=60,
        batch_pixels=8192,
        output_resolution=1.6,
        seed=0,
        bias_correction="none",
        pose_search=False,
        refit_rounds=0,
    )
    psnr = {}
    for name, device in (("cpu", torch.device("cpu")), ("device", DEVICE)):
        with as_the_device() if name == "device" else contextlib.nullcontext():
            result = reconstruct(
                phantom_stacks.stack_paths, phantom_stacks.mask_paths, None,
                settings.updated(device=device.type),
            )  # fmt: skip
        assert result.report["device"].startswith(device.type)
        psnr[name] = evaluate(sitk.Cast(result.volume, sitk.sitkFloat32), truth, mask)["psnr"]
    assert psnr["cpu"] > 20.0, psnr
    assert abs(psnr["device"] - psnr["cpu"]) < 0.5, psnr
