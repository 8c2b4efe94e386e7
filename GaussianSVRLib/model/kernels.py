"""Fused CPU kernels (numba) for forward.evaluate and evaluate_slices: one pass per pixel, a
hand-derived backward.

Plain torch materializes (B, K, ...) gathers for every intermediate and its backward scatters them
back with index_add; here each pixel-Gaussian pair is computed in registers, in float64 (the 3x3
determinant of a thin PSF-widened covariance loses digits in float32); the forward keeps each
pair's weight w (B, K) for the backward, which recomputes the rest of the pair. Pixels are moved by
their slice's rigid motion x = R p + b inside the kernels and read their slice's PSF from a table
(M, 6): gathering rotations and PSFs per pixel in torch, and scattering their gradients back, cost
about a third of a training step. numba is optional: it is imported on first use, so this module
imports without it; call available() first. Compiled code is cached on disk by numba (next to
this file, or in the user's cache folder when the package is read-only).

Per pair (b, j), with d = x_b - mu_j, S = Sigma_j + PSF_b as a 6-vector (xx, xy, xz, yy, yz, zz),
adj/det its adjugate and determinant and D = max(det, 1e-12) (the clamp of psf.convolved_gaussian):

    w_bj = exp(-0.5 d^T adj d / D) * sqrt(det Sigma_j / D)    ("exact"; "none" with S = Sigma_j)
    w_bj = exp(-0.5 d^T adj d / D)                            ("normalized")

out_b = sum_j c_j w_bj, divided by (sum_j w_bj + delta) in the normalized mode. The backward
differentiates the same polynomial expressions torch does (including the clamp), so it matches
torch autograd of forward.evaluate_torch to rounding. Per-Gaussian and per-slice gradients are
summed without races into one (N, 11) and one (M, 18) buffer per thread; the backward visits
pixels along a space-filling curve so that consecutive pixels share Gaussians in cache (it is
memory bound in random batch order).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from ..timing import PROFILE
from .psf import NORMALIZATION_DELTA, PSF_MODES

DET_FLOOR = 1e-12
#: Columns of the per-Gaussian gradient buffer: means (3), cov6 (6), cov_det (1), intensities (1).
GAUSSIAN_GRAD_COLUMNS = 11
#: Columns of the per-slice gradient buffer: rotation (9, row-major), offset (3), PSF (6).
SLICE_GRAD_COLUMNS = 18
#: Resolution of the space-filling-curve order of the pixels (bits per axis; 5 makes 16-bit keys).
ORDER_BITS = 5
#: Pixels per work item of the kernels (handed to threads dynamically: the machine may be shared).
PIXEL_CHUNK = 512


def available() -> bool:
    """True if numba can be imported (the fused kernels can run)."""
    return importlib.util.find_spec("numba") is not None


def enabled() -> bool:
    """The fused CPU kernels (these and grid_kernel.py) are used when numba is importable, unless
    GAUSSIANSVR_KERNEL=torch."""
    return os.environ.get("GAUSSIANSVR_KERNEL", "fused") != "torch" and available()


#: The numba module once _kernels() has imported it: this module must import without numba.
numba = None


def _forward_kernel(
    positions, slice_id, rotations, offsets, neighbours, means, cov6, cov_det, intensities, psf6,
    exact, normalized, out, norm, weights, chunk,
):  # fmt: skip
    """Values out (B,) at pixels positions (B, 3) on slices slice_id (B,), moved by their slice's
    x = R p + b (rotations (M, 3, 3), offsets (M, 3)), from their neighbours (B, K); see the module
    docstring.

    psf6 (M, 6) is each slice's PSF (zero rows for none); norm (B, 2) receives the normalizer and
    the float64 value in the normalized mode; weights (B, K), if it has B rows, every pair's w for
    the backward. Chunks of pixels are handed to threads dynamically.
    """
    n_points, k_max = neighbours.shape
    use_psf = psf6.shape[0] > 0
    keep = weights.shape[0] == n_points
    for t in numba.prange((n_points + chunk - 1) // chunk):
        for i in range(t * chunk, min((t + 1) * chunk, n_points)):
            s = slice_id[i]
            x, y, z = _moved(positions, rotations, offsets, i, s)
            p0 = p1 = p2 = p3 = p4 = p5 = 0.0
            if use_psf:
                p0, p1, p2 = np.float64(psf6[s, 0]), np.float64(psf6[s, 1]), np.float64(psf6[s, 2])
                p3, p4, p5 = np.float64(psf6[s, 3]), np.float64(psf6[s, 4]), np.float64(psf6[s, 5])
            num = 0.0
            total = 0.0
            for k in range(k_max):
                j = neighbours[i, k]
                dx = x - means[j, 0]
                dy = y - means[j, 1]
                dz = z - means[j, 2]
                a, b, c = cov6[j, 0] + p0, cov6[j, 1] + p1, cov6[j, 2] + p2
                d, e, f = cov6[j, 3] + p3, cov6[j, 4] + p4, cov6[j, 5] + p5
                aa, ab, ac = d * f - e * e, c * e - b * f, b * e - c * d
                ad, ae, af = a * f - c * c, b * c - a * e, a * d - b * b
                det = a * aa + b * ab + c * ac
                det = max(det, DET_FLOOR)
                q = (
                    aa * dx * dx
                    + ad * dy * dy
                    + af * dz * dz
                    + 2.0 * (ab * dx * dy + ac * dx * dz + ae * dy * dz)
                )
                w = np.exp(-0.5 * q / det)
                if exact:
                    w *= np.sqrt(cov_det[j] / det)
                if keep:
                    weights[i, k] = w
                num += intensities[j] * w
                total += w
            if normalized:
                # kept in float64 for the backward: c_j - mean cancels where one Gaussian dominates
                norm[i, 0] = total + NORMALIZATION_DELTA
                norm[i, 1] = num / (total + NORMALIZATION_DELTA)
                out[i] = norm[i, 1]
            else:
                out[i] = num


def _backward_kernel(
    order, positions, slice_id, rotations, offsets, neighbours, means, cov6, cov_det, intensities, psf6,
    exact, normalized, grad_out, norm, weights, grad_slices, grad_gaussians, chunk,
):  # fmt: skip
    """Gradients of the forward kernel's output given grad_out (B,) and its pair weights (B, K).

    grad_slices (T, M, 18) (rotation 9 row-major, offset 3, PSF 6) and grad_gaussians (T, N, 11)
    are accumulated if they have M and N rows, each thread into its own slice (no races; the caller
    sums the T slices). Pixels are visited in ``order`` (B,), in chunks handed to threads
    dynamically.
    """
    n_points, k_max = neighbours.shape
    use_psf = psf6.shape[0] > 0
    want_slices = grad_slices.shape[1] == rotations.shape[0]
    want_gaussians = grad_gaussians.shape[1] == means.shape[0]
    n_chunks = (n_points + chunk - 1) // chunk
    for t in numba.prange(n_chunks):
        thread = numba.get_thread_id()
        acc = grad_gaussians[thread]
        slice_acc = grad_slices[thread]
        for rank in range(t * chunk, min((t + 1) * chunk, n_points)):
            i = order[rank]
            go = np.float64(grad_out[i])
            if go == 0.0:
                continue
            s = slice_id[i]
            x, y, z = _moved(positions, rotations, offsets, i, s)
            p0 = p1 = p2 = p3 = p4 = p5 = 0.0
            if use_psf:
                p0, p1, p2 = np.float64(psf6[s, 0]), np.float64(psf6[s, 1]), np.float64(psf6[s, 2])
                p3, p4, p5 = np.float64(psf6[s, 3]), np.float64(psf6[s, 4]), np.float64(psf6[s, 5])
            mean_out = 0.0
            if normalized:
                go /= norm[i, 0]
                mean_out = norm[i, 1]
            gx = gy = gz = 0.0
            g0 = g1 = g2 = g3 = g4 = g5 = 0.0
            for k in range(k_max):
                j = neighbours[i, k]
                dx = x - means[j, 0]
                dy = y - means[j, 1]
                dz = z - means[j, 2]
                a, b, c = cov6[j, 0] + p0, cov6[j, 1] + p1, cov6[j, 2] + p2
                d, e, f = cov6[j, 3] + p3, cov6[j, 4] + p4, cov6[j, 5] + p5
                aa, ab, ac = d * f - e * e, c * e - b * f, b * e - c * d
                ad, ae, af = a * f - c * c, b * c - a * e, a * d - b * b
                det = a * aa + b * ab + c * ac
                live = det >= DET_FLOOR  # the clamp passes no gradient below the floor
                det = max(det, DET_FLOOR)
                inv = 1.0 / det
                ux = aa * dx + ab * dy + ac * dz
                uy = ab * dx + ad * dy + ae * dz
                uz = ac * dx + ae * dy + af * dz
                q = dx * ux + dy * uy + dz * uz
                w = weights[i, k]
                cj = intensities[j]
                grad_w = go * (cj - mean_out)
                grad_log = grad_w * w  # dL/dlog(w)
                # d log w / d delta = -adj delta / D
                sx = -grad_log * inv * ux
                sy = -grad_log * inv * uy
                sz = -grad_log * inv * uz
                # d log w / d S: through q = delta^T adj(S) delta (polynomial in S) and through D
                xx, xy, xz, yy, yz, zz = (
                    dx * dx,
                    2.0 * dx * dy,
                    2.0 * dx * dz,
                    dy * dy,
                    2.0 * dy * dz,
                    dz * dz,
                )
                hq = -0.5 * grad_log * inv
                hd = 0.0
                if live:
                    hd = grad_log * (0.5 * q * inv * inv - (0.5 * inv if exact else 0.0))
                s0 = hq * (yy * f - yz * e + zz * d) + hd * aa
                s1 = hq * (-xy * f + xz * e + yz * c - 2.0 * zz * b) + hd * 2.0 * ab
                s2 = hq * (xy * e - xz * d - 2.0 * yy * c + yz * b) + hd * 2.0 * ac
                s3 = hq * (xx * f - xz * c + zz * a) + hd * ad
                s4 = hq * (-2.0 * xx * e + xy * c + xz * b - yz * a) + hd * 2.0 * ae
                s5 = hq * (xx * d - xy * b + yy * a) + hd * af
                gx += sx
                gy += sy
                gz += sz
                g0 += s0
                g1 += s1
                g2 += s2
                g3 += s3
                g4 += s4
                g5 += s5
                if want_gaussians:
                    acc[j, 0] -= sx
                    acc[j, 1] -= sy
                    acc[j, 2] -= sz
                    acc[j, 3] += s0
                    acc[j, 4] += s1
                    acc[j, 5] += s2
                    acc[j, 6] += s3
                    acc[j, 7] += s4
                    acc[j, 8] += s5
                    if exact:
                        # d w / d det(Sigma_j) = w / (2 det(Sigma_j))
                        acc[j, 9] += 0.5 * grad_w * w / cov_det[j]
                    acc[j, 10] += go * w
            if want_slices:
                # x = R p + b: dL/dR = g p^T, dL/db = g
                u, v, w_ = positions[i, 0], positions[i, 1], positions[i, 2]
                slice_acc[s, 0] += gx * u
                slice_acc[s, 1] += gx * v
                slice_acc[s, 2] += gx * w_
                slice_acc[s, 3] += gy * u
                slice_acc[s, 4] += gy * v
                slice_acc[s, 5] += gy * w_
                slice_acc[s, 6] += gz * u
                slice_acc[s, 7] += gz * v
                slice_acc[s, 8] += gz * w_
                slice_acc[s, 9] += gx
                slice_acc[s, 10] += gy
                slice_acc[s, 11] += gz
                if use_psf:
                    slice_acc[s, 12] += g0
                    slice_acc[s, 13] += g1
                    slice_acc[s, 14] += g2
                    slice_acc[s, 15] += g3
                    slice_acc[s, 16] += g4
                    slice_acc[s, 17] += g5


def _moved(positions, rotations, offsets, i, s):
    """Pixel i (positions (B, 3)) moved by slice s: R_s p + b_s, in float64."""
    u, v, w = np.float64(positions[i, 0]), np.float64(positions[i, 1]), np.float64(positions[i, 2])
    x = rotations[s, 0, 0] * u + rotations[s, 0, 1] * v + rotations[s, 0, 2] * w + offsets[s, 0]
    y = rotations[s, 1, 0] * u + rotations[s, 1, 1] * v + rotations[s, 1, 2] * w + offsets[s, 1]
    z = rotations[s, 2, 0] * u + rotations[s, 2, 1] * v + rotations[s, 2, 2] * w + offsets[s, 2]
    return x, y, z


def _morton_order(points, bits):
    """Permutation (B,) visiting points (B, 3) along a Morton curve on a 2**bits grid of their box.

    A counting sort on the curve index: O(B + 8**bits). Non-finite points go first.
    """
    n_points = points.shape[0]
    low = np.full(3, np.inf)
    high = np.full(3, -np.inf)
    for i in range(n_points):
        for axis in range(3):
            v = points[i, axis]
            if np.isfinite(v):
                low[axis] = min(low[axis], v)
                high[axis] = max(high[axis], v)
    top = (1 << bits) - 1
    scale = top / max(high[0] - low[0], high[1] - low[1], high[2] - low[2], 1e-12)
    keys = np.zeros(n_points, np.int64)
    for i in range(n_points):
        key = 0
        for axis in range(3):
            v = points[i, axis]
            cell = int(min(max((v - low[axis]) * scale, 0.0), top)) if np.isfinite(v) else 0
            for bit in range(bits):
                key |= ((cell >> bit) & 1) << (3 * bit + axis)
        keys[i] = key
    counts = np.zeros((1 << (3 * bits)) + 1, np.int64)
    for i in range(n_points):
        counts[keys[i] + 1] += 1
    for key in range(1, counts.shape[0]):
        counts[key] += counts[key - 1]
    order = np.empty(n_points, np.int64)
    for i in range(n_points):
        order[counts[keys[i]]] = i
        counts[keys[i]] += 1
    return order


@functools.cache
def _kernels():
    """The compiled forward and backward kernels (from numba's on-disk cache when possible)."""
    global numba, _moved
    import numba

    # The kernels call _moved by its global name, which must be compiled before they are.
    _moved = numba.njit(cache=True, fastmath=True)(_moved)
    compile_ = numba.njit(parallel=True, fastmath=True, cache=True)
    return (
        compile_(_forward_kernel),
        compile_(_backward_kernel),
        numba.njit(cache=True)(_morton_order),
    )


def use_torch_threads() -> int:
    """Set numba (every kernel of the engine) to as many threads as torch uses, within numba's pool
    size; returns that count."""
    import numba as numba_

    threads = max(1, min(torch.get_num_threads(), numba_.config.NUMBA_NUM_THREADS))
    numba_.set_num_threads(threads)
    return threads


def _check_slices(positions, slice_id, rotations, offsets, psf6) -> None:
    """Raise what torch would on bad slice inputs: the kernels index without bounds checks."""
    if positions.device.type != "cpu":
        raise ValueError(f"the fused kernels run on the CPU, got positions on {positions.device}")
    if positions.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"the fused kernels need float32 or float64 positions, got {positions.dtype}")
    if positions.requires_grad:
        raise ValueError("the fused kernels give no gradient for positions (the slices' motion has it)")
    n_points, n_slices = positions.shape[0], rotations.shape[0]
    shapes = {
        "positions": (positions, (n_points, 3)),
        "slice_id": (slice_id, (n_points,)),
        "rotations": (rotations, (n_slices, 3, 3)),
        "offsets": (offsets, (n_slices, 3)),
    }
    if psf6 is not None:
        shapes["psf6"] = (psf6, (n_slices, 6))
    for name, (tensor, shape) in shapes.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
    if slice_id.numel() and (int(slice_id.min()) < 0 or int(slice_id.max()) >= n_slices):
        raise IndexError(f"slice_id outside 0..{n_slices - 1}")


def _check_inputs(neighbours, means, cov6, cov_det, intensities, mode) -> None:
    """Raise what torch would on bad Gaussian inputs: the kernels index without bounds checks."""
    if mode not in PSF_MODES:
        raise ValueError(f"unknown PSF mode {mode!r}; expected one of {PSF_MODES}")
    n_gaussians = means.shape[0]
    shapes = {
        "means": (means, (n_gaussians, 3)),
        "cov6": (cov6, (n_gaussians, 6)),
        "cov_det": (cov_det, (n_gaussians,)),
        "intensities": (intensities, (n_gaussians,)),
    }
    for name, (tensor, shape) in shapes.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
    if neighbours.ndim != 2:
        raise ValueError(f"neighbours has shape {tuple(neighbours.shape)}, expected (B, K)")
    if neighbours.numel() and (int(neighbours.min()) < 0 or int(neighbours.max()) >= n_gaussians):
        raise IndexError(f"neighbours index outside 0..{n_gaussians - 1}")


class _FusedEvaluate(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, positions, slice_id, rotations, offsets, neighbours, means, cov6, cov_det, intensities, psf6,
        mode, differentiable,
    ):  # fmt: skip
        dtype = positions.dtype
        use_psf = psf6 is not None and mode != "none"
        floats = [
            t.detach().to(dtype).contiguous()
            for t in (positions, rotations, offsets, means, cov6, cov_det, intensities)
        ]
        psf = psf6.detach().to(dtype).contiguous() if use_psf else torch.zeros(0, 6, dtype=dtype)
        index = neighbours.detach().to(torch.int64).contiguous()
        slices = slice_id.detach().to(torch.int64).contiguous()
        p, r, b, m, c6, cd, c = (t.numpy() for t in floats)
        exact, normalized = mode != "normalized", mode == "normalized"
        out = np.empty(len(p), p.dtype)
        norm = np.empty((len(p) if normalized else 0, 2))
        # Every pair's weight for the backward, which then needs no exp or sqrt; none without one.
        weights = np.empty((len(p) if differentiable else 0, index.shape[1]))
        forward_kernel, _, _ = _kernels()
        use_torch_threads()
        with PROFILE.section("kernel_forward"), numba.parallel_chunksize(1):
            forward_kernel(p, slices.numpy(), r, b, index.numpy(), m, c6, cd, c, psf.numpy(), exact,
                           normalized, out, norm, weights, PIXEL_CHUNK)  # fmt: skip
        result = torch.from_numpy(out)
        # saved as tensors so that autograd notices inputs modified in place before the backward
        ctx.save_for_backward(*floats, psf, index, slices)
        ctx.mode_flags = (exact, normalized, use_psf)
        ctx.norm, ctx.weights = norm, weights
        return result

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        p, r, b, m, c6, cd, c, psf, index, slices = (t.numpy() for t in ctx.saved_tensors)
        exact, normalized, use_psf = ctx.mode_flags
        need = ctx.needs_input_grad
        n_slices, n_gaussians = len(r), len(m)
        want_psf = need[9] and use_psf
        want_slices, want_gaussians = need[2] or need[3] or want_psf, any(need[5:9])
        _, backward_kernel, morton_order = _kernels()
        # Visit the pixels near where they are (their slice's rotation left out, a small turn).
        order = morton_order(p + b[slices], ORDER_BITS)
        threads = use_torch_threads()
        grad_slices = np.zeros((threads, n_slices if want_slices else 0, SLICE_GRAD_COLUMNS))
        grad_gaussians = np.zeros((threads, n_gaussians if want_gaussians else 0, GAUSSIAN_GRAD_COLUMNS))
        go = grad_out.detach().to(ctx.saved_tensors[0].dtype).contiguous().numpy()
        with PROFILE.section("kernel_backward"), numba.parallel_chunksize(1):
            backward_kernel(order, p, slices, r, b, index, m, c6, cd, c, psf, exact, normalized, go,
                            ctx.norm, ctx.weights, grad_slices, grad_gaussians, PIXEL_CHUNK)  # fmt: skip
        per_slice = torch.from_numpy(grad_slices.sum(0).astype(p.dtype)) if want_slices else None
        per_gaussian = torch.from_numpy(grad_gaussians.sum(0).astype(p.dtype)) if want_gaussians else None

        def part(total: torch.Tensor | None, flag: bool, columns: slice, shape: tuple) -> torch.Tensor | None:
            return total[:, columns].reshape(-1, *shape).contiguous() if flag else None

        return (
            None,
            None,
            part(per_slice, need[2], slice(0, 9), (3, 3)),
            part(per_slice, need[3], slice(9, 12), (3,)),
            None,
            part(per_gaussian, need[5], slice(0, 3), (3,)),
            part(per_gaussian, need[6], slice(3, 9), (6,)),
            part(per_gaussian, need[7], slice(9, 10), ()),  # zeros in the normalized mode, as in torch
            part(per_gaussian, need[8], slice(10, 11), ()),
            part(per_slice, want_psf, slice(12, 18), (6,)),
            None,
            None,
        )


def evaluate_slices_fused(
    positions: torch.Tensor,
    slice_id: torch.Tensor,
    rotations: torch.Tensor,
    offsets: torch.Tensor,
    neighbours: torch.Tensor,
    means: torch.Tensor,
    cov6: torch.Tensor,
    cov_det: torch.Tensor,
    intensities: torch.Tensor,
    psf6: torch.Tensor | None = None,
    mode: str = "exact",
) -> torch.Tensor:
    """forward.evaluate_slices (same arguments, shapes and result) as one fused CPU kernel pair.

    CPU tensors only; the result has the dtype of positions (float32 or float64), the other inputs
    are converted to it; per-pair arithmetic is float64. Differentiable (once) w.r.t. rotations,
    offsets, means, cov6, cov_det, intensities and psf6, not positions. Needs numba (see available()).
    """
    _check_slices(positions, slice_id, rotations, offsets, psf6)
    _check_inputs(neighbours, means, cov6, cov_det, intensities, mode)
    tensors = (rotations, offsets, means, cov6, cov_det, intensities, psf6)
    differentiable = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return _FusedEvaluate.apply(
        positions, slice_id, rotations, offsets, neighbours, means, cov6, cov_det, intensities, psf6, mode,
        differentiable,
    )  # fmt: skip


def evaluate_fused(
    points: torch.Tensor,
    neighbours: torch.Tensor,
    means: torch.Tensor,
    cov6: torch.Tensor,
    cov_det: torch.Tensor,
    intensities: torch.Tensor,
    psf6: torch.Tensor | None = None,
    mode: str = "exact",
) -> torch.Tensor:
    """forward.evaluate (same arguments, shapes and result) as one fused CPU kernel pair.

    CPU tensors only; the result has the dtype of points (float32 or float64), the other inputs are
    converted to it; per-pair arithmetic is float64. Differentiable (once) w.r.t. points, means,
    cov6, cov_det, intensities and psf6. Needs numba (see available()).
    """
    n = points.shape[0]
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points has shape {tuple(points.shape)}, expected ({n}, 3)")
    if psf6 is not None and tuple(psf6.shape) != (n, 6):
        raise ValueError(f"psf6 has shape {tuple(psf6.shape)}, expected ({n}, 6)")
    eye = torch.eye(3, dtype=points.dtype)
    if psf6 is None and not points.requires_grad:
        # One slice that does not move.
        zero = torch.zeros(n, dtype=torch.int64)
        return evaluate_slices_fused(
            points, zero, eye[None], torch.zeros(1, 3, dtype=points.dtype), neighbours, means, cov6,
            cov_det, intensities, None, mode,
        )  # fmt: skip
    # A slice per point, the point its offset (differentiable) and the point's own PSF.
    return evaluate_slices_fused(
        torch.zeros_like(points), torch.arange(n), eye.expand(n, 3, 3), points, neighbours, means, cov6,
        cov_det, intensities, psf6, mode,
    )  # fmt: skip
