"""The slices of the stacks: every masked pixel with its nominal world position (LPS mm), per slice
its pivot, axes and PSF widths. The optimizer sees only a ``SliceSet``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..geometry import apply_affine
from .stacks import Stack

FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))


#: In-plane PSF FWHM as a multiple of the pixel size (SVRTK and NeSVoR convention).
IN_PLANE_FWHM_FACTOR = 1.2


@dataclass
class SliceSet:
    """All masked pixels of all slices. P pixels, M slices, S stacks.

    values (P,) float32, positions (P, 3) nominal LPS mm, pixel_slice (P,) int64 slice id,
    pixel_index (P,) int64 flat index into the stack array; slice_stack (M,), slice_k (M,),
    slice_centre (M, 3) pivot in nominal LPS mm, slice_axes (M, 3, 3) unit columns (i, j, k axes),
    psf_sigma (M, 3) PSF standard deviations (mm) along those axes.
    """

    values: np.ndarray
    positions: np.ndarray
    pixel_slice: np.ndarray
    pixel_index: np.ndarray
    slice_stack: np.ndarray
    slice_k: np.ndarray
    slice_centre: np.ndarray
    slice_axes: np.ndarray
    psf_sigma: np.ndarray

    @property
    def n_slices(self) -> int:
        return len(self.slice_stack)

    @property
    def n_pixels(self) -> int:
        return len(self.values)


def psf_sigmas(stack: Stack, in_plane_factor: float = IN_PLANE_FWHM_FACTOR) -> np.ndarray:
    """PSF standard deviations (3,) in mm along the stack's i, j, k axes."""
    spacing = stack.spacing
    fwhm = np.array([in_plane_factor * spacing[0], in_plane_factor * spacing[1], stack.thickness])
    return fwhm * FWHM_TO_SIGMA


def extract_slices(stacks: list[Stack], in_plane_factor: float = IN_PLANE_FWHM_FACTOR) -> SliceSet:
    """Every masked pixel of every slice with its nominal world position; empty slices are skipped."""
    values, positions, pixel_slice, pixel_index = [], [], [], []
    slice_stack, slice_k, slice_centre, slice_axes, sigma = [], [], [], [], []
    for s, stack in enumerate(stacks):
        nk, nj, ni = stack.data.shape
        axes = stack.direction
        sig = psf_sigmas(stack, in_plane_factor)
        for k in range(nk):
            jj, ii = np.nonzero(stack.mask[k])
            if len(ii) == 0:
                continue
            index = np.stack([ii, jj, np.full_like(ii, k)], -1).astype(np.float64)
            world = apply_affine(stack.affine, index)
            centre_index = np.array([(ni - 1) / 2.0, (nj - 1) / 2.0, k])
            values.append(stack.data[k, jj, ii])
            positions.append(world)
            pixel_slice.append(np.full(len(ii), len(slice_stack), dtype=np.int64))
            pixel_index.append((k * nj + jj) * ni + ii)
            slice_stack.append(s)
            slice_k.append(k)
            slice_centre.append(apply_affine(stack.affine, centre_index))
            slice_axes.append(axes)
            sigma.append(sig)
    return SliceSet(
        values=np.concatenate(values).astype(np.float32),
        positions=np.concatenate(positions),
        pixel_slice=np.concatenate(pixel_slice),
        pixel_index=np.concatenate(pixel_index).astype(np.int64),
        slice_stack=np.asarray(slice_stack, dtype=np.int64),
        slice_k=np.asarray(slice_k, dtype=np.int64),
        slice_centre=np.asarray(slice_centre),
        slice_axes=np.asarray(slice_axes),
        psf_sigma=np.asarray(sigma),
    )


def coarsen_slices(slices: SliceSet, stacks: list[Stack], factor: int = 2) -> SliceSet:
    """The same slices at 1/factor in-plane resolution, for the coarse stage of coarse-to-fine.

    Keeps one pixel per factor x factor block (its top-left pixel must be in the mask), moved to
    the block centre, with the block mean as its value and an in-plane PSF widened to the block.
    Slice ids, centres and axes are unchanged, so motion carries over between stages.
    """
    stack_of_pixel = slices.slice_stack[slices.pixel_slice]
    keep = np.zeros(slices.n_pixels, dtype=bool)
    values = slices.values.copy()
    positions = slices.positions.copy()
    for s, stack in enumerate(stacks):
        on_stack = np.nonzero(stack_of_pixel == s)[0]
        nk, nj, ni = stack.data.shape
        flat = slices.pixel_index[on_stack]
        i, j, k = flat % ni, (flat // ni) % nj, flat // (ni * nj)
        corner = (i % factor == 0) & (j % factor == 0)
        sel = on_stack[corner]
        keep[sel] = True
        pad = ((0, 0), (0, (-nj) % factor), (0, (-ni) % factor))
        padded = np.pad(stack.data, pad, mode="edge")
        blocks = padded.reshape(nk, padded.shape[1] // factor, factor, padded.shape[2] // factor, factor)
        means = blocks.mean(axis=(2, 4))
        values[sel] = means[k[corner], j[corner] // factor, i[corner] // factor]
        shift = (factor - 1) / 2.0 * (stack.affine[:3, 0] + stack.affine[:3, 1])
        positions[sel] += shift
    sigma = slices.psf_sigma.copy()
    sigma[:, :2] *= factor
    return SliceSet(
        values=values[keep],
        positions=positions[keep],
        pixel_slice=slices.pixel_slice[keep],
        pixel_index=slices.pixel_index[keep],
        slice_stack=slices.slice_stack,
        slice_k=slices.slice_k,
        slice_centre=slices.slice_centre,
        slice_axes=slices.slice_axes,
        psf_sigma=sigma,
    )
