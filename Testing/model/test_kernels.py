"""The fused numba kernels against the plain torch forward.evaluate_torch (values and autograd)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

pytest.importorskip("numba")

from testkit import random_covariances

from GaussianSVRLib.model import forward, kernels  # noqa: E402
from GaussianSVRLib.model.motion import SliceMotion
from GaussianSVRLib.model.psf import from_sym6, to_sym6
from GaussianSVRLib.model.rotations import rotvec_to_matrix

MODES = ("exact", "normalized", "none")
INPUT_NAMES = ("points", "neighbours", "means", "cov6", "cov_det", "intensities", "psf6")


def make_inputs(n_points: int = 64, k: int = 8, n_gaussians: int = 40, seed: int = 0) -> list:
    """float32 inputs of forward.evaluate_torch: Gaussians and points in one 8 mm box, so weights matter.

    Neighbours are drawn with replacement, so rows hold repeated indices.
    """
    generator = torch.Generator().manual_seed(seed)
    means = 8.0 * torch.rand(n_gaussians, 3, generator=generator, dtype=torch.float64)
    cov = random_covariances(n_gaussians, 0.8, 2.0, generator)
    psf = random_covariances(n_points, 0.3, 1.3, generator)
    points = 8.0 * torch.rand(n_points, 3, generator=generator, dtype=torch.float64)
    neighbours = torch.randint(0, n_gaussians, (n_points, k), generator=generator)
    intensities = torch.rand(n_gaussians, generator=generator, dtype=torch.float64)
    values = [points, neighbours, means, to_sym6(cov), torch.linalg.det(cov), intensities, to_sym6(psf)]
    return [v.float() if v.is_floating_point() else v for v in values]


def leaves(inputs: list, dtype: torch.dtype, requires: tuple[str, ...] = INPUT_NAMES) -> list:
    """Fresh copies in dtype; the floating ones named in ``requires`` require grad."""
    out = []
    for name, value in zip(INPUT_NAMES, inputs, strict=True):
        if value is None or not value.is_floating_point():
            out.append(value)
        else:
            out.append(value.detach().to(dtype).clone().requires_grad_(name in requires))
    return out


def run(function, inputs: list, mode: str, upstream: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Values (B,) and the gradients of (upstream * values).sum() w.r.t. each input (or None)."""
    values = function(*inputs, mode=mode)
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    grads = torch.autograd.grad((values * upstream.to(values.dtype)).sum(), wanted, allow_unused=True)
    by_input = dict(zip(map(id, wanted), grads, strict=True))
    return values.detach(), [by_input.get(id(t)) if t is not None else None for t in inputs]


def upstream_weights(n_points: int, seed: int = 1) -> torch.Tensor:
    """Random dL/dvalue (B,) with a few exact zeros (the backward skips those pixels)."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(n_points, generator=generator, dtype=torch.float64)
    weights[::7] = 0.0
    return weights


def assert_matches(ours: torch.Tensor, reference: torch.Tensor, rtol: float = 2e-5) -> None:
    """float32 kernel vs float64 torch on the same float32-representable inputs."""
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    torch.testing.assert_close(ours.double(), reference, rtol=rtol, atol=rtol * max(scale, 1e-30))


def compare(inputs: list, mode: str, requires: tuple[str, ...] = INPUT_NAMES) -> None:
    """Fused (float32) and torch (float64) values and gradients agree, including which are None."""
    upstream = upstream_weights(len(inputs[0]))
    reference, reference_grads = run(
        forward.evaluate_torch, leaves(inputs, torch.float64, requires), mode, upstream
    )
    values, grads = run(kernels.evaluate_fused, leaves(inputs, torch.float32, requires), mode, upstream)
    assert values.dtype == torch.float32 and values.shape == reference.shape
    assert_matches(values, reference)
    for name, ours, theirs in zip(INPUT_NAMES, grads, reference_grads, strict=True):
        assert (ours is None) == (theirs is None), f"gradient of {name}: {ours is None=} {theirs is None=}"
        if theirs is not None:
            assert ours.shape == theirs.shape, name
            assert_matches(ours, theirs)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_psf", [True, False])
def test_values_and_gradients_match_torch(mode: str, with_psf: bool) -> None:
    inputs = make_inputs()
    if not with_psf:
        inputs[6] = None
    compare(inputs, mode)


@pytest.mark.parametrize("mode", MODES)
def test_repeated_neighbours(mode: str) -> None:
    inputs = make_inputs(n_points=32, k=6, seed=3)
    neighbours = inputs[1]
    neighbours[:, 1] = neighbours[:, 0]
    neighbours[:8] = neighbours[:8, :1]  # whole rows of one Gaussian
    compare(inputs, mode)


@pytest.mark.parametrize("requires", [("intensities",), ("points", "psf6"), ("means", "cov6", "cov_det")])
def test_only_requested_gradients(requires: tuple[str, ...]) -> None:
    compare(make_inputs(seed=4), "exact", requires)


def test_clamped_determinant_passes_gradient_through_adjugate_only() -> None:
    """Tiny covariances without PSF: det(S) < 1e-12 is clamped, as in psf.convolved_gaussian."""
    inputs = make_inputs(n_points=24, k=4, n_gaussians=10, seed=5)
    inputs[3] = inputs[3] * 1e-5
    inputs[4] = inputs[4] * 1e-15
    generator = torch.Generator().manual_seed(6)
    inputs[0] = (inputs[2][inputs[1][:, 0]] + 1e-3 * torch.randn(24, 3, generator=generator)).float()
    assert float(torch.linalg.det(from_sym6(inputs[3].double())).max()) < 1e-12
    for mode in ("exact", "normalized"):
        inputs_without_psf = inputs[:6] + [None]
        compare(inputs_without_psf, mode)


def test_thread_count_does_not_change_results() -> None:
    inputs = make_inputs(n_points=3000, k=8, n_gaussians=200, seed=7)
    upstream = upstream_weights(3000)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(run(kernels.evaluate_fused, leaves(inputs, torch.float32), "exact", upstream))
    finally:
        torch.set_num_threads(threads)
    (values_1, grads_1), (values_2, grads_2) = results
    torch.testing.assert_close(values_1, values_2, rtol=0, atol=0)
    for ours, theirs in zip(grads_1, grads_2, strict=True):
        if theirs is not None:
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6 * float(theirs.abs().max()))


def test_float64_inputs_give_float64_results() -> None:
    inputs = leaves(make_inputs(n_points=16, k=4, seed=8), torch.float64, ())
    values = kernels.evaluate_fused(*inputs, mode="exact")
    assert values.dtype == torch.float64
    torch.testing.assert_close(values, forward.evaluate_torch(*inputs, mode="exact"), rtol=1e-12, atol=1e-12)


def test_bad_inputs_raise_instead_of_reading_out_of_bounds() -> None:
    inputs = make_inputs(n_points=8, k=3, n_gaussians=5, seed=9)
    bad_index = [inputs[0], inputs[1].clone(), *inputs[2:]]
    bad_index[1][2, 1] = 5
    with pytest.raises(IndexError):
        kernels.evaluate_fused(*bad_index)
    with pytest.raises(ValueError, match="psf6"):
        kernels.evaluate_fused(*inputs[:6], inputs[6][:4])
    with pytest.raises(ValueError, match="mode"):
        kernels.evaluate_fused(*inputs, mode="sharp")


def test_module_imports_and_reports_unavailable_without_numba(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "numba", None)  # makes `import numba` fail
    spec = importlib.util.spec_from_file_location("GaussianSVRLib.model._kernels_probe", kernels.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.available() is False


SLICE_NAMES = ("rotations", "offsets", "means", "cov6", "cov_det", "intensities", "psf6")


def slice_inputs(n_points: int = 96, n_slices: int = 5, seed: int = 10) -> dict:
    """float32 inputs of forward.evaluate_slices: pixels of a few turned slices through the 8 mm box
    of make_inputs' Gaussians, every slice with its own PSF."""
    points, neighbours, means, cov6, cov_det, intensities, _ = make_inputs(n_points=n_points, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    rotvec = 0.4 * torch.randn(n_slices, 3, generator=generator, dtype=torch.float64)
    psf = random_covariances(n_slices, 0.3, 1.3, generator)
    return {
        "positions": points - 4.0,
        "slice_id": torch.randint(0, n_slices, (n_points,), generator=generator),
        "rotations": rotvec_to_matrix(rotvec).float(),
        "offsets": (4.0 + 0.5 * torch.randn(n_slices, 3, generator=generator, dtype=torch.float64)).float(),
        "neighbours": neighbours,
        "means": means,
        "cov6": cov6,
        "cov_det": cov_det,
        "intensities": intensities,
        "psf6": to_sym6(psf).float(),
    }


def run_slices(inputs: dict, dtype: torch.dtype, mode: str, upstream: torch.Tensor, requires=SLICE_NAMES):
    """Values and gradients (by name, None where not asked) of forward.evaluate_slices."""
    leaves_ = {
        name: value.detach().to(dtype).clone().requires_grad_(name in requires)
        if value is not None and value.is_floating_point() and name != "positions"
        else value.to(dtype)
        if name == "positions"
        else value
        for name, value in inputs.items()
    }
    values = forward.evaluate_slices(**leaves_, mode=mode)
    wanted = [name for name in SLICE_NAMES if leaves_[name] is not None and leaves_[name].requires_grad]
    grads = torch.autograd.grad(
        (values * upstream.to(values.dtype)).sum(), [leaves_[n] for n in wanted], allow_unused=True
    )
    return values.detach(), dict(zip(wanted, grads, strict=True))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_psf", [True, False])
def test_slices_match_torch(mode: str, with_psf: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels that move the pixels themselves agree with rotating, gathering and evaluating in
    torch: values and the gradients of every slice and Gaussian table."""
    inputs = slice_inputs()
    if not with_psf:
        inputs["psf6"] = None
    upstream = upstream_weights(len(inputs["positions"]))
    values, grads = run_slices(inputs, torch.float32, mode, upstream)
    monkeypatch.setenv("GAUSSIANSVR_KERNEL", "torch")
    reference, reference_grads = run_slices(inputs, torch.float64, mode, upstream)
    assert values.dtype == torch.float32
    assert_matches(values, reference)
    assert grads.keys() == reference_grads.keys()
    for name, theirs in reference_grads.items():
        ours = grads[name]
        if mode == "none" and name == "psf6":
            assert ours is None and theirs is None
            continue
        assert ours is not None and ours.shape == theirs.shape, name
        assert_matches(ours, theirs)


def test_slices_give_only_requested_gradients() -> None:
    inputs = slice_inputs(seed=11)
    upstream = upstream_weights(len(inputs["positions"]))
    _, grads = run_slices(inputs, torch.float32, "exact", upstream, requires=("rotations",))
    assert set(grads) == {"rotations"} and grads["rotations"].abs().max() > 0


def test_slices_refuse_bad_inputs() -> None:
    inputs = slice_inputs(n_points=8, n_slices=3, seed=12)
    with pytest.raises(IndexError, match="slice_id"):
        kernels.evaluate_slices_fused(**{**inputs, "slice_id": inputs["slice_id"] + 3})
    with pytest.raises(ValueError, match="psf6"):
        kernels.evaluate_slices_fused(**{**inputs, "psf6": inputs["psf6"][:2]})
    with pytest.raises(ValueError, match="positions"):
        kernels.evaluate_slices_fused(**{**inputs, "positions": inputs["positions"].requires_grad_()})


def test_slice_offsets_move_pixels_as_the_motion_does() -> None:
    """predict() moves pixels by R p + b (SliceMotion.offsets), the neighbour search by
    SliceMotion.move: both must put every pixel at the same place."""
    generator = torch.Generator().manual_seed(13)
    centres = 50.0 * torch.randn(6, 3, generator=generator)
    motion = SliceMotion(centres, 0.3 * torch.randn(6, 3, generator=generator), torch.randn(6, 3))
    slice_id = torch.randint(0, 6, (200,), generator=generator)
    positions = centres[slice_id] + 20.0 * torch.randn(200, 3, generator=generator)
    rotations = motion.rotations()
    moved = (rotations[slice_id] @ positions[:, :, None])[..., 0] + motion.offsets(rotations)[slice_id]
    torch.testing.assert_close(moved, motion.move(positions, slice_id, rotations), rtol=0, atol=1e-4)
