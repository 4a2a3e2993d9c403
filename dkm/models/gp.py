"""The GP / kernel-regression global matcher of DKM with a cosine kernel and a Fourier basis."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..geometry.coords import normalized_grid


class CosKernel(nn.Module):
    """Exponentiated cosine similarity ``K(x, y) = exp((cos(x, y) - 1) / T)``.

    ``T`` is a fixed temperature (a buffer-less Python float), as in the released models.
    """

    def __init__(self, T: float, eps: float = 1e-6):
        super().__init__()
        self.T = T
        self.eps = eps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x`` (B, N, D), ``y`` (B, M, D) -> kernel matrix (B, N, M)."""
        c = torch.einsum("bnd,bmd->bnm", x, y) / (
            x.norm(dim=-1)[..., None] * y.norm(dim=-1)[:, None] + self.eps
        )
        return ((c - 1.0) / self.T).exp()


class GP(nn.Module):
    """Posterior mean of a GP that regresses support-image positions (embedded in a Fourier basis)
    from support features, evaluated at the query features.

    ``mu_x = K_xy (K_yy + sigma^2 I)^-1 f(y)`` with ``f`` the Fourier embedding of the support grid.
    The covariance output of the paper's full GP is not used by any released model and is omitted.

    Args:
        T: kernel temperature.
        gp_dim: dimension of the Fourier embedding (output channels).
        sigma_noise: noise added to the diagonal of ``K_yy``.

    The faithful path inverts ``K_yy + sigma^2 I`` explicitly (as the release); the fast path solves
    by Cholesky. Both work one matrix at a time (batched CPU inverses are unreliable on some torch
    builds, pytorch#142815) and always in float32, also under autocast.
    """

    def __init__(self, T: float = 0.2, gp_dim: int = 256, sigma_noise: float = 0.1):
        super().__init__()
        self.K = CosKernel(T)
        self.sigma_noise = sigma_noise
        self.pos_conv = nn.Conv2d(2, gp_dim, 1, 1)

    def basis(self, h: int, w: int, b: int, like: torch.Tensor) -> torch.Tensor:
        """Fourier embedding of the normalized pixel-centre grid: (B, gp_dim, h, w)."""
        grid = normalized_grid(h, w, device=like.device, dtype=like.dtype, batch=b).permute(0, 3, 1, 2)
        return torch.cos(8 * math.pi * self.pos_conv(grid))

    @staticmethod
    def _cholesky_solve(A: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        """``A^-1 rhs`` for one SPD matrix ``A`` (N, N) and ``rhs`` (N, D); falls back to an LU
        solve if ``A`` is numerically not positive definite."""
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0:
            return torch.cholesky_solve(rhs, L)
        return torch.linalg.solve(A, rhs)

    def forward(self, x: torch.Tensor, y: torch.Tensor, fast: bool = False) -> torch.Tensor:
        """Query features ``x`` and support features ``y`` (B, C, h, w) -> GP mean (B, gp_dim, h, w)."""
        if x.shape != y.shape:
            raise ValueError(f"GP expects query and support features of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        with torch.autocast(x.device.type, enabled=False):
            dtype = torch.promote_types(x.dtype, torch.float32)  # float32 (or float64), never half
            return self._mean(x.to(dtype), y.to(dtype), fast)

    def _mean(self, x: torch.Tensor, y: torch.Tensor, fast: bool) -> torch.Tensor:
        b, _, h, w = y.shape
        f = self.basis(h, w, b, y).flatten(2).transpose(1, 2)  # (B, hw, D)
        x = x.flatten(2).transpose(1, 2)
        y = y.flatten(2).transpose(1, 2)
        K_yy = self.K(y, y)
        K_xy = self.K(x, y)
        eye = torch.eye(h * w, device=x.device, dtype=x.dtype)
        A = K_yy + self.sigma_noise * eye
        if fast:
            alpha = torch.stack([self._cholesky_solve(A[i], f[i]) for i in range(b)])
        else:  # as the release: explicit inverse (one matrix at a time), then batched products
            alpha = torch.stack([torch.linalg.inv(A[i]) for i in range(b)]).matmul(f)
        mu = K_xy.matmul(alpha)  # (B, hw, D)
        return mu.transpose(1, 2).reshape(b, -1, h, w)
