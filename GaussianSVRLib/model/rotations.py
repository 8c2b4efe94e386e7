"""Rotations in torch, differentiable: rotation vectors and quaternions to matrices, slice motion on points.

The conventions are those of geometry.py: ``x = R(r) (p - c) + c + t`` for a slice's motion.
"""

from __future__ import annotations

import torch


def skew(v: torch.Tensor) -> torch.Tensor:
    """Cross-product matrices (..., 3, 3) of vectors (..., 3)."""
    zero = torch.zeros_like(v[..., 0])
    x, y, z = v.unbind(-1)
    return torch.stack(
        [torch.stack([zero, -z, y], -1), torch.stack([z, zero, -x], -1), torch.stack([-y, x, zero], -1)], -2
    )


def rotvec_to_matrix(rotvec: torch.Tensor) -> torch.Tensor:
    """Rodrigues: rotation vectors (..., 3) in radians -> rotation matrices (..., 3, 3).

    Uses the Taylor series near zero so that gradients stay finite at the identity.
    """
    theta2 = (rotvec * rotvec).sum(-1, keepdim=True)[..., None]
    theta = torch.sqrt(theta2.clamp_min(1e-12))
    small = theta2 < 1e-8
    a = torch.where(small, 1.0 - theta2 / 6.0, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24.0, (1.0 - torch.cos(theta)) / theta2.clamp_min(1e-12))
    k = skew(rotvec)
    eye = torch.eye(3, dtype=rotvec.dtype, device=rotvec.device).expand(k.shape)
    return eye + a * k + b * (k @ k)


def quaternion_to_matrix(quat: torch.Tensor) -> torch.Tensor:
    """Quaternions (..., 4) as (w, x, y, z), not necessarily unit -> rotation matrices (..., 3, 3)."""
    q = quat / quat.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        [
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )


def apply_slice_motion(
    points: torch.Tensor, centre: torch.Tensor, rotation: torch.Tensor, translation: torch.Tensor
) -> torch.Tensor:
    """x = R (p - c) + c + t for points (P, 3), with per-point centre (P, 3), R (P, 3, 3), t (P, 3)."""
    return torch.einsum("pij,pj->pi", rotation, points - centre) + centre + translation
