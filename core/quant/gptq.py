"""GPTQ on one weight matrix: Hessian accumulation and the blocked error-feedback solver.

Follows Frantar et al. (2022) and the reference code (IST-DASLab/gptq, ``gptq.py``,
``quant.py``) with qcore's quantizer conventions (:mod:`qcore.quant.qparams`):

* ``H = 2/N sum_x x x^T`` over every calibration token, kept as a running mean in float32.
* Dead inputs (``H_ii = 0``): ``H_ii := 1`` and the weight column set to 0.
* ``act_order``: columns permuted by descending ``diag(H)``.
* ``H += damp * mean(diag(H)) * I``; ``U = cholesky(cholesky_inverse(cholesky(H)), upper)``.
* Column by column inside lazy blocks: ``q = Q(w)``, ``err = (w - q) / U_ii``, the rest of
  the block updated with ``err U[i, i:]``; after a block the remaining columns get
  ``Err U[block, rest]`` in one matmul.
* Groups: quantizer parameters computed when ``col % G == 0`` from the group's columns as
  they stand at that moment (every earlier column's error already fed back), or, with
  ``static_groups``, up front from the original weights.

The functions are device- and dtype-agnostic (float64 weights stay float64, which the
tests use to compare algorithm variants without rounding noise).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from qcore.errors import NonFiniteError
from qcore.quant.observers import MSEClip, find_params
from qcore.quant.qparams import fake_quantize
from qcore.schemes import QuantArgs

log = logging.getLogger(__name__)

Cholesky = Callable[..., torch.Tensor]


@contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class HessianAccumulator:
    """Running mean ``H = 2/N sum x x^T`` over all tokens seen (float32 unless told).

    H is symmetric, so each update computes only the upper part, one block of rows at a
    time: with ``blocks`` column blocks that is (blocks + 1) / (2 blocks) of the full
    product (~30% less time at 4 blocks on SmolLM2's 576 and 1536 inputs). Reading
    :attr:`H` mirrors the upper triangle into the lower one in place."""

    def __init__(self, columns: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, blocks: int = 4) -> None:
        self.columns = columns
        self._sums = torch.zeros(columns, columns, device=device, dtype=dtype)
        self._mirrored = True
        self._step = max(1, -(-columns // blocks))
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if x.shape[-1] != self.columns:
            raise ValueError(f"input has {x.shape[-1]} features, the Hessian {self.columns}")
        n = x.shape[0]
        if n == 0:
            return
        total = self.tokens + n
        self._sums.mul_(self.tokens / total)
        self.tokens = total
        x = x.to(self._sums.dtype) * math.sqrt(2.0 / total)
        for start in range(0, self.columns, self._step):
            stop = min(start + self._step, self.columns)
            self._sums[start:stop, start:].addmm_(x[:, start:stop].t(), x[:, start:])
        self._mirrored = False

    @property
    def H(self) -> torch.Tensor:
        if not self._mirrored:
            upper = torch.triu(self._sums)
            self._sums = upper.add_(torch.triu(upper, 1).t())
            self._mirrored = True
        return self._sums


class CholeskyFailed(RuntimeError):
    pass


def inverse_cholesky_upper(
    H: torch.Tensor,
    damp: float,
    damp_step: float,
    max_steps: int,
    *,
    cholesky: Cholesky | None = None,
    cholesky_inverse: Cholesky | None = None,
    name: str = "linear",
) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of ``(H + d mean(diag H) I)^-1``; ``d`` starts at ``damp`` and
    grows by ``damp_step`` while the factorisation fails (at most ``max_steps`` raises).

    Returns (factor, relative dampening used, number of raises)."""
    cholesky = cholesky or (lambda a, upper=False: torch.linalg.cholesky(a, upper=upper))
    cholesky_inverse = cholesky_inverse or (
        lambda f, upper=False: torch.cholesky_inverse(f, upper=upper))
    if not bool(torch.isfinite(H).all()):
        bad = int((~torch.isfinite(H)).sum())
        raise NonFiniteError(
            f"{name}: its Hessian (X^T X of the inputs) holds {bad} NaN/inf entries, so the "
            "inputs were not finite: an earlier layer or the source weights produced them. "
            "No damping can fix this.")
    mean_diag = float(torch.diagonal(H).mean())
    last_error = ""
    for step in range(max_steps + 1):
        rel = damp + step * damp_step
        Hd = H.clone()
        Hd.diagonal().add_(rel * mean_diag)
        try:  # at most two columns x columns temporaries alive at once (321 MB each at 8960)
            L = cholesky(Hd)
            del Hd
            inverse = cholesky_inverse(L)
            del L
            U = cholesky(inverse, upper=True)
            del inverse
            if torch.isfinite(U).all():
                return U, rel, step
            last_error = "non-finite factor"
        except RuntimeError as exc:  # torch.linalg.LinAlgError is a RuntimeError
            last_error = str(exc).splitlines()[0]
        if step < max_steps:
            log.warning("%s: Cholesky failed with damp %.4g x mean(diag H) (%s); raising it "
                        "to %.4g", name, rel, last_error, rel + damp_step)
    raise CholeskyFailed(
        f"{name}: the Hessian (finite, from finite inputs) is not positive definite even "
        f"with damp "
        f"{damp + max_steps * damp_step:.4g} x mean(diag H) = {mean_diag:.4g} after "
        f"{max_steps} raises of damp_step={damp_step} (last error: {last_error}). Raise damp, "
        f"damp_step or damp_max_steps, or calibrate on more tokens."
    )


@dataclass
class HessianFactor:
    """What the solver needs from a Hessian alone; linears fed the same input (q/k/v,
    gate/up) share one instead of factorising the same matrix again."""

    U: torch.Tensor          # upper Cholesky factor of the damped inverse, processing order
    dead: torch.Tensor       # (in,) bool: inputs that never fired (H_ii = 0)
    perm: torch.Tensor | None  # act_order's processing order of the columns
    damp: float              # relative dampening used
    damp_raises: int


def factor_hessian(
    H: torch.Tensor,
    *,
    act_order: bool = False,
    damp: float = 0.01,
    damp_step: float = 0.0015,
    damp_max_steps: int = 50,
    cholesky: Cholesky | None = None,
    cholesky_inverse: Cholesky | None = None,
    name: str = "linear",
) -> HessianFactor:
    """Dead inputs, act_order's permutation and the damped inverse Cholesky factor of H
    (computed in H's dtype)."""
    dead = torch.diagonal(H) == 0
    if bool(dead.any()):  # changed below: a copy (the caller's H scores the loss)
        H = H.clone()
        H[dead, dead] = 1
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True)
        H = H[perm][:, perm]
    U, rel_damp, raises = inverse_cholesky_upper(
        H, damp, damp_step, damp_max_steps, cholesky=cholesky,
        cholesky_inverse=cholesky_inverse, name=name)
    return HessianFactor(U=U, dead=dead, perm=perm, damp=rel_damp, damp_raises=raises)


@dataclass
class GPTQResult:
    Q: torch.Tensor          # (out, in) quantized weight in the original column order
    scale: torch.Tensor      # (out, n_groups)
    zero: torch.Tensor       # (out, n_groups), integral values
    g_idx: torch.Tensor      # (in,) int32, column -> group
    perm: torch.Tensor | None
    damp: float              # relative dampening used
    damp_raises: int
    dead: int                # number of dead input columns
    loss: float              # tr((W - Q) H (W - Q)^T) with the undamped H


def objective(weight: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """GPTQ's layer objective tr((W - Q) H (W - Q)^T)."""
    delta = weight.to(H.dtype) - Q.to(H.dtype)
    return float(((delta @ H) * delta).sum())


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    H: torch.Tensor,
    args: QuantArgs,
    *,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    damp: float = 0.01,
    damp_step: float = 0.0015,
    damp_max_steps: int = 50,
    mse: MSEClip | None = None,
    cholesky: Cholesky | None = None,
    cholesky_inverse: Cholesky | None = None,
    factor: HessianFactor | None = None,
    name: str = "linear",
    loss: bool = True,
) -> GPTQResult:
    """Quantize a (out, in) weight given its input Hessian; see the module docstring.

    ``factor``: :func:`factor_hessian` of this H with the same act_order and dampening
    (computed here when not given). ``loss=False`` skips the objective (NaN in the result):
    a caller that stacked several linears' rows scores each one itself."""
    if args.granularity not in ("channel", "group"):
        raise ValueError(f"{name}: GPTQ quantizes weights per channel or per group, not "
                         f"{args.granularity!r}")
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    W = weight.detach().to(dtype).clone()
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"{name}: Hessian {tuple(H.shape)} does not match {cols} inputs")
    H0 = H.to(dtype)
    if factor is None:
        factor = factor_hessian(H0, act_order=act_order, damp=damp, damp_step=damp_step,
                                damp_max_steps=damp_max_steps, cholesky=cholesky,
                                cholesky_inverse=cholesky_inverse, name=name)
    elif factor.U.dtype != dtype or (factor.perm is not None) != act_order:
        raise ValueError(f"{name}: the given Hessian factor is {factor.U.dtype} with "
                         f"act_order={factor.perm is not None}; the weight needs {dtype} "
                         f"with act_order={act_order}")
    grouped = args.granularity == "group"
    G = args.group_size if grouped else cols
    assert G is not None
    if cols % G:
        raise ValueError(f"{name}: group_size {G} does not divide the {cols} input features")
    n_groups = cols // G

    scales = torch.empty(rows, n_groups, dtype=dtype, device=W.device)
    zeros = torch.empty(rows, n_groups, dtype=dtype, device=W.device)
    if not grouped:  # per channel: parameters of the whole row, before dead columns go
        s, z = find_params(W, args, mse)
        scales[:, :1], zeros[:, :1] = s, z

    dead = factor.dead
    n_dead = int(dead.sum())
    if n_dead:
        W[:, dead] = 0

    static = grouped and static_groups
    if static:
        for g in range(n_groups):
            s, z = find_params(W[:, g * G:(g + 1) * G], args, mse)
            scales[:, g:g + 1], zeros[:, g:g + 1] = s, z

    perm = factor.perm
    if perm is not None:
        W = W[:, perm]
    U = factor.U

    # column (in processing order) -> group whose parameters quantize it
    if not grouped:
        col_group = torch.zeros(cols, dtype=torch.long, device=W.device)
    elif static and perm is not None:
        col_group = perm // G
    else:
        col_group = torch.arange(cols, device=W.device) // G
    col_group_list = col_group.tolist()

    # the solver works on W^T so that a column of W is one contiguous row in memory
    Wt = W.t().contiguous()
    del W
    Qt = torch.zeros_like(Wt)
    bits = args.bits
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        count = i2 - i1
        W1 = Wt[i1:i2].clone()          # (count, rows)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        diag = torch.diagonal(U1).tolist()
        with _one_thread():  # vector-sized ops: threading costs more than it gives
            for i in range(count):
                col = i1 + i
                if grouped and not static and col % G == 0:
                    end = col + G
                    if end <= i2:
                        wg = W1[i:end - i1]
                    else:  # group runs past the block: bring its outside columns up to date
                        rest = Wt[i2:end] - U[i1:col, i2:end].t() @ Err1[:i]
                        wg = torch.cat([W1[i:], rest], dim=0)
                    s, z = find_params(wg.t(), args, mse)
                    scales[:, col // G:col // G + 1], zeros[:, col // G:col // G + 1] = s, z
                g = col_group_list[col]
                w = W1[i]
                q = fake_quantize(w, scales[:, g], zeros[:, g], bits)
                Qt[col] = q
                err = Err1[i]
                torch.sub(w, q, out=err)
                err.div_(diag[i])
                W1[i:].addr_(U1[i, i:], err, alpha=-1)
        if i2 < cols:
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), Err1, alpha=-1)
    Q = Qt.t().contiguous()

    if perm is not None:
        inv = torch.argsort(perm)
        Q = Q[:, inv]
        g_idx = torch.empty(cols, dtype=torch.int32, device=Q.device)
        g_idx[perm] = col_group.to(torch.int32)
    else:
        g_idx = col_group.to(torch.int32)
    return GPTQResult(Q=Q, scale=scales, zero=zeros, g_idx=g_idx, perm=perm, damp=factor.damp,
                      damp_raises=factor.damp_raises, dead=n_dead,
                      loss=objective(weight, Q, H0) if loss else math.nan)
