"""Top-k singular triplets of a weight, computed once, in high precision, with fixed signs."""

from __future__ import annotations

import torch

FLOAT64_MAX_ELEMENTS = 4096 * 4096


def top_singular_triplets(
    weight: torch.Tensor, k: int, method: str = "full", niter: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_k, s_k, V_k) with W ~ U_k diag(s_k) V_k^T, s_k descending.

    Computed in float64 (float32 for layers above 4096 x 4096) whatever the weight's dtype.
    Each pair (u_i, v_i) is signed so that the largest-magnitude entry of u_i is positive,
    so the same weight always gives the same factors. ``method`` is ``full``
    (torch.linalg.svd) or ``randomized`` (torch.svd_lowrank with ``niter`` iterations).
    """
    precision = torch.float64 if weight.numel() <= FLOAT64_MAX_ELEMENTS else torch.float32
    w = weight.detach().to(precision)
    if method == "randomized":
        u, s, v = torch.svd_lowrank(w, q=k, niter=niter)
    else:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        v = vh.T
    u, s, v = u[:, :k], s[:k], v[:, :k]
    signs = torch.sign(u.gather(0, u.abs().argmax(dim=0, keepdim=True)))
    signs[signs == 0] = 1.0
    return u * signs, s, v * signs
