"""Benchmark of the k-NN backends of GaussianSVRLib.neighbours on brain-shaped synthetic data.

Centres: N points in an ellipsoid of 100 x 80 x 70 mm, 70 % uniform and 30 % in a 6 mm cortical
shell (so the density varies by about 3x, as after content-adaptive initialization). Queries: the
pixels of stacks of thick slices (0.8 mm pixels, slices 3 mm apart) cycling through axial, coronal
and sagittal orientations with a few degrees of motion, clipped to the ellipsoid; about 150k
pixels per stack, so 4 stacks ~ 0.6 M queries and 13 stacks ~ 2 M.

Times are build + query (wall clock), median of ``--repeats`` runs, all backends of a configuration
measured back to back in one process so their ratios are comparable. Brute-force backends
(torch, faiss flat) are timed on a query subset and scaled linearly to Q (their cost is exactly
linear in Q); those cells are marked with ``~``. Peak memory is the max RSS of a fresh subprocess
running one backend on one configuration (``--memory``).

Usage: python bench/bench_neighbours.py [--quick] [--memory] [--write docs/benchmarks_neighbours.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from GaussianSVRLib import neighbours  # noqa: E402

SEMI_AXES = np.array([50.0, 40.0, 35.0])
PIXELS_PER_STACK = 150_000


def inside_ellipsoid(points: np.ndarray) -> np.ndarray:
    return ((points / SEMI_AXES) ** 2).sum(1) <= 1.0


def make_centres(n: int, seed: int = 0) -> np.ndarray:
    """Gaussian centres (n, 3) float32: 70 % uniform in the ellipsoid, 30 % in its outer 6 mm."""
    rng = np.random.default_rng(seed)
    n_shell = int(0.3 * n)
    points = []
    while sum(len(p) for p in points) < n - n_shell:
        candidates = rng.uniform(-SEMI_AXES, SEMI_AXES, size=(n, 3))
        points.append(candidates[inside_ellipsoid(candidates)])
    uniform = np.concatenate(points)[: n - n_shell]
    directions = rng.normal(size=(n_shell, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    depth = rng.uniform(0.0, 6.0, size=(n_shell, 1))
    shell = directions * (SEMI_AXES - depth)
    return np.concatenate([uniform, shell]).astype(np.float32)


def _rotation(rotvec: np.ndarray) -> np.ndarray:
    angle = np.linalg.norm(rotvec)
    if angle == 0:
        return np.eye(3)
    x, y, z = rotvec / angle
    skew = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) + np.sin(angle) * skew + (1 - np.cos(angle)) * skew @ skew


def make_queries(n_stacks: int, seed: int = 0) -> np.ndarray:
    """Pixel positions (Q, 3) float32 of n_stacks stacks of slices inside the ellipsoid, in slice order."""
    rng = np.random.default_rng(seed)
    half = float(SEMI_AXES.max()) + 5.0
    in_plane = np.arange(-half, half, 0.8)
    u, v = (a.ravel() for a in np.meshgrid(in_plane, in_plane, indexing="ij"))
    out = []
    for stack in range(n_stacks):
        axes = np.roll(np.eye(3), stack % 3, axis=1)  # columns: in-plane u, in-plane v, normal
        axes = _rotation(rng.normal(scale=np.radians(5.0), size=3)) @ axes
        offset = rng.uniform(0.0, 3.0)
        for w in np.arange(-half + offset, half, 3.0):
            slice_motion = _rotation(rng.normal(scale=np.radians(1.0), size=3))
            pixels = slice_motion @ axes @ np.stack([u, v, np.full_like(u, w)]) + rng.normal(scale=0.5, size=(3, 1))
            pixels = pixels.T
            out.append(pixels[inside_ellipsoid(pixels)])
    return np.concatenate(out).astype(np.float32)
