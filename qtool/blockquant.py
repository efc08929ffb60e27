"""Block-wise low-bit weight quantization along K (numpy): round-to-nearest with MSE-optimal block scales,
and GPTQ. Produces `passes.nbits.BlockWeight` (MatMulNBits' orientation: weight rows are the N output
columns, blocks run along K).

RTN: per block, the scale (and zero point) minimizing the block's squared error over a grid of clipping
ratios of its range, then one least-squares refit of the scale to the chosen codes, kept where it lowers
the error. Symmetric codes are [-2^(b-1), 2^(b-1) - 1] stored with the op's default zero point 2^(b-1);
asymmetric blocks carry a zero point in [0, 2^b).

GPTQ (Frantar et al., 2022): columns k of W [N, K] are quantized in order, each column's rounding error
spread over the columns not yet quantized through the inverse Hessian of the layer's inputs,
H = X^T X / n (+ 1% of its mean diagonal as damping). A block's scale is chosen (as RTN does) from the
block's weights as updated when GPTQ reaches its first column. No activation reordering, so it is
deterministic given H and keeps blocks contiguous in K as MatMulNBits stores them.
"""
from __future__ import annotations

import numpy as np

from passes.nbits import BlockWeight

GRID = np.linspace(0.5, 1.0, 26)  # clipping ratios of the block range searched for the MSE-optimal scale
GPTQ_DAMP = 0.01
GPTQ_LAZY = 128  # columns updated together (the lazy batch of GPTQ); a multiple of the block size


def _qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)


def block_params(v: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """(scale float32 [R], zero point [R]) of each row of `v` [R, B] minimizing the row's squared error.
    Symmetric zero points are 0 (in signed codes)."""
    qmin, qmax = _qrange(bits, symmetric)
    v = v.astype(np.float32)
    if symmetric:
        amax = np.abs(v).max(axis=1)
        lo, hi = -amax, amax
    else:
        lo, hi = np.minimum(v.min(axis=1), 0), np.maximum(v.max(axis=1), 0)
    best_err = np.full(len(v), np.inf)
    best_s = np.ones(len(v), np.float32)
    best_z = np.zeros(len(v), np.float32)
    for r in GRID:
        if symmetric:  # r * amax lands on qmax or (for the low end) -qmax - 1 = qmin: try both
            cands = [(r * amax / qmax, 0.0), (r * amax / -qmin, 0.0)]
        else:
            s = (r * (hi - lo)) / (qmax - qmin)
            z = np.clip(np.round(-r * lo / np.where(s > 0, s, 1)), qmin, qmax)
            cands = [(s, z)]
        for s, z in cands:
            s = np.where(s > 0, s, 1.0).astype(np.float32)
            z = np.broadcast_to(np.asarray(z, np.float32), s.shape)
            err = _error(v, s, z, qmin, qmax)
            better = err < best_err
            best_err, best_s, best_z = np.where(better, err, best_err), np.where(better, s, best_s), \
                np.where(better, z, best_z)
    # the least-squares scale for the chosen codes and zero point, where it lowers the error after re-rounding
    d = _codes(v, best_s, best_z, qmin, qmax) - best_z[:, None]
    dd = (d * d).sum(axis=1)
    s = np.where(dd > 0, (d * v).sum(axis=1) / np.where(dd > 0, dd, 1), best_s).astype(np.float32)
    s = np.where(s > 0, s, best_s).astype(np.float32)
    err = _error(v, s, best_z, qmin, qmax)
    best_s = np.where(err < best_err, s, best_s)
    return best_s.astype(np.float32), best_z


def _codes(v, s, z, qmin, qmax):
    return np.clip(np.round(v / s[:, None]) + z[:, None], qmin, qmax)


def _error(v, s, z, qmin, qmax):
    q = _codes(v, s, z, qmin, qmax)
    return (((q - z[:, None]) * s[:, None] - v) ** 2).sum(axis=1)


def _store(codes: np.ndarray, bits: int, symmetric: bool) -> np.ndarray:
    """Signed symmetric codes shifted by the op's default zero point; unsigned codes as they are."""
    return (codes + (2 ** (bits - 1) if symmetric else 0)).astype(np.uint8)


def _blocks(w_nk: np.ndarray, block_size: int) -> np.ndarray:
    n, k = w_nk.shape
    nb = -(-k // block_size)
    padded = np.zeros((n, nb * block_size), np.float32)  # zeros quantize exactly with any scale / zero point
    padded[:, :k] = w_nk
    return padded.reshape(n * nb, block_size)


def rtn(w_kn: np.ndarray, bits: int = 4, block_size: int = 32, symmetric: bool = False) -> BlockWeight:
    """Round-to-nearest of a [K, N] weight with the MSE-optimal scale of each block."""
    w = np.asarray(w_kn, np.float32).T
    n, k = w.shape
    nb = -(-k // block_size)
    v = _blocks(w, block_size)
    s, z = block_params(v, bits, symmetric)
    qmin, qmax = _qrange(bits, symmetric)
    codes = _codes(v, s, z, qmin, qmax).reshape(n, nb * block_size)[:, :k]
    return BlockWeight(_store(codes, bits, symmetric), s.reshape(n, nb),
                       None if symmetric else z.reshape(n, nb).astype(np.uint8), bits, block_size)


def gptq(w_kn: np.ndarray, hessian: np.ndarray, bits: int = 4, block_size: int = 32,
         symmetric: bool = False, damp: float = GPTQ_DAMP) -> BlockWeight:
    """GPTQ of a [K, N] weight given the Hessian H [K, K] of its inputs (module docstring)."""
    W = np.asarray(w_kn, np.float64).T.copy()  # [N, K]
    n, k = W.shape
    H = np.asarray(hessian, np.float64).copy()
    if H.shape != (k, k):
        raise ValueError(f"hessian must be [{k}, {k}], got {H.shape}")
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0  # inputs that are always zero: their weights never matter
    H[np.diag_indices(k)] += damp * float(np.mean(np.diag(H)))
    L = np.linalg.cholesky(H)
    Linv = np.linalg.solve(L, np.eye(k))
    U = np.linalg.cholesky(Linv.T @ Linv).T  # upper Cholesky factor of H^-1
    qmin, qmax = _qrange(bits, symmetric)
    nb = -(-k // block_size)
    codes = np.zeros((n, k), np.float32)
    scales = np.zeros((n, nb), np.float32)
    zeros = np.zeros((n, nb), np.float32)
    lazy = max(GPTQ_LAZY, block_size)
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        W1 = W[:, i1:i2].copy()
        E1 = np.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % block_size == 0:
                b = col // block_size
                blk = W1[:, i:i + block_size].astype(np.float32)
                if blk.shape[1] < block_size:
                    blk = np.pad(blk, ((0, 0), (0, block_size - blk.shape[1])))
                scales[:, b], zeros[:, b] = block_params(blk, bits, symmetric)
            b = col // block_size
            s, z = scales[:, b], zeros[:, b]
            w = W1[:, i]
            q = np.clip(np.round(w.astype(np.float32) / s) + z, qmin, qmax)
            codes[:, col] = q
            err = (w - (q - z).astype(np.float64) * s) / U1[i, i]
            W1[:, i:] -= np.outer(err, U1[i, i:])
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return BlockWeight(_store(codes, bits, symmetric), scales, None if symmetric else zeros.astype(np.uint8),
                       bits, block_size)
