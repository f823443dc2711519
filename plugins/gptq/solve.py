"""GPTQ's solve of one weight matrix: the blocked error-feedback quantization of Frantar et
al. (2022) against the Hessian of the matrix's inputs.

The Hessian ``H = 2/N sum_x x x^T`` (a running mean over the calibration tokens) is a core
primitive, :class:`qcore.quant.hessian.HessianAccumulator`; this module only reads it. It
follows the reference code (IST-DASLab/gptq, ``gptq.py``, ``quant.py``) with qcore's
quantizer conventions (:mod:`qcore.quant.qparams`):

* Dead inputs (``H_ii = 0``): ``H_ii := 1`` and the weight column set to 0.
* ``act_order``: columns permuted by descending ``diag(H)``.
* ``H += damp * mean(diag(H)) * I``; ``U = cholesky(cholesky_inverse(cholesky(H)), upper)``
  (:func:`factor_hessian`; ``damp`` grows by ``damp_step`` while the factorisation fails).
* Column by column inside lazy blocks: ``q = Q(w)``, ``err = (w - q) / U_ii``, the rest of
  the block updated with ``err U[i, i:]``; after a block the remaining columns get
  ``Err U[block, rest]`` in one matmul.
* Groups: quantizer parameters computed when ``col % G == 0`` from the group's columns as
  they stand at that moment (every earlier column's error already fed back), or, with
  ``static_groups``, up front from the original weights.

The options are one :class:`GPTQOptions`; the factorisations run on a :class:`Linalg` (a
qcore ``Backend`` is one; by default torch on the Hessian's device). The functions are
device- and dtype-agnostic (float64 weights stay float64, which the tests use to compare
algorithm variants without rounding noise).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from qcore.errors import NonFiniteError
from qcore.quant.observers import MSEClip, find_params
from qcore.quant.qparams import fake_quantize
from qcore.schemes import QuantArgs

log = logging.getLogger(__name__)


def _require(ok: bool, field: str, what: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"GPTQOptions.{field} must be {what}, not {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


@dataclass(frozen=True)
class GPTQOptions:
    """How :func:`gptq_quantize` solves (see the module docstring), checked on creation.
    ``GPTQSolverConfig.options()`` builds one from the plugin's options."""

    block_size: int = 128        # columns per lazy block: changes the speed, not the result
    act_order: bool = False      # process the columns by descending diag(H)
    static_groups: bool = False  # group parameters up front from the original weights
    damp: float = 0.01           # dampening added to diag(H), relative to mean(diag(H))
    damp_step: float = 0.0015    # added to the dampening each time the factorisation fails
    damp_max_steps: int = 50     # raises of the dampening tried before CholeskyFailed
    mse: MSEClip | None = None   # the quantizer's clip search (None: plain min/max)

    def __post_init__(self) -> None:
        _require(_is_int(self.block_size) and self.block_size > 0, "block_size",
                 "an int > 0", self.block_size)
        _require(_is_int(self.damp_max_steps) and self.damp_max_steps >= 0, "damp_max_steps",
                 "an int >= 0", self.damp_max_steps)
        for flag in ("act_order", "static_groups"):
            _require(isinstance(getattr(self, flag), bool), flag, "a bool", getattr(self, flag))
        _require(_is_number(self.damp) and self.damp >= 0, "damp", "a finite number >= 0",
                 self.damp)
        _require(_is_number(self.damp_step) and self.damp_step > 0, "damp_step",
                 "a finite number > 0", self.damp_step)
        _require(self.mse is None or isinstance(self.mse, MSEClip), "mse",
                 "an MSEClip or None", self.mse)


class Linalg(Protocol):
    """Where the factorisations run; a qcore ``Backend`` is one (Cholesky on Ascend NPU goes
    elsewhere than the CUDA/CPU one)."""

    def cholesky(self, a: torch.Tensor, upper: bool = False) -> torch.Tensor: ...

    def cholesky_inverse(self, factor: torch.Tensor, upper: bool = False) -> torch.Tensor: ...


class TorchLinalg:
    """torch on the tensors' own device: the default :class:`Linalg`."""

    def cholesky(self, a: torch.Tensor, upper: bool = False) -> torch.Tensor:
        return torch.linalg.cholesky(a, upper=upper)

    def cholesky_inverse(self, factor: torch.Tensor, upper: bool = False) -> torch.Tensor:
        return torch.cholesky_inverse(factor, upper=upper)


@contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class CholeskyFailed(RuntimeError):
    pass


def inverse_cholesky_upper(
    H: torch.Tensor,
    damp: float,
    damp_step: float,
    max_steps: int,
    *,
    linalg: Linalg | None = None,
    name: str = "linear",
) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of ``(H + d mean(diag H) I)^-1``; ``d`` starts at ``damp`` and
    grows by ``damp_step`` while the factorisation fails (at most ``max_steps`` raises).

    Returns (factor, relative dampening used, number of raises)."""
    linalg = linalg if linalg is not None else TorchLinalg()
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
            L = linalg.cholesky(Hd)
            del Hd
            inverse = linalg.cholesky_inverse(L)
            del L
            U = linalg.cholesky(inverse, upper=True)
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
    options: GPTQOptions | None = None,
    *,
    linalg: Linalg | None = None,
    name: str = "linear",
) -> HessianFactor:
    """Dead inputs, act_order's permutation and the damped inverse Cholesky factor of H
    (computed in H's dtype) with ``options``' act_order and dampening."""
    opts = options if options is not None else GPTQOptions()
    dead = torch.diagonal(H) == 0
    if bool(dead.any()):  # changed below: a copy (the caller's H scores the loss)
        H = H.clone()
        H[dead, dead] = 1
    perm = None
    if opts.act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True)
        H = H[perm][:, perm]
    U, rel_damp, raises = inverse_cholesky_upper(
        H, opts.damp, opts.damp_step, opts.damp_max_steps, linalg=linalg, name=name)
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


@dataclass
class _Groups:
    """The quantizer parameters while the columns are solved: a scale and a zero per row and
    group, and the group that quantizes each column (in processing order)."""

    args: QuantArgs
    mse: MSEClip | None
    size: int                   # G: columns per group (every column when per channel)
    grouped: bool
    dynamic: bool               # grouped, not static: fitted when the solver reaches a group
    scale: torch.Tensor         # (rows, n_groups)
    zero: torch.Tensor          # (rows, n_groups)
    of_column: torch.Tensor     # (in,) long: processing-order column -> group
    of_column_list: list[int]

    def fit(self, g: int, w: torch.Tensor) -> None:
        """Group ``g``'s parameters from its (rows, columns) weights ``w``."""
        s, z = find_params(w, self.args, self.mse)
        self.scale[:, g:g + 1], self.zero[:, g:g + 1] = s, z


def _layout_groups(W: torch.Tensor, args: QuantArgs, opts: GPTQOptions,
                   perm: torch.Tensor | None, name: str) -> _Groups:
    """The (still unfitted) parameters of a (rows, cols) weight and each column's group."""
    rows, cols = W.shape
    grouped = args.granularity == "group"
    G = args.group_size if grouped else cols
    assert G is not None
    if cols % G:
        raise ValueError(f"{name}: group_size {G} does not divide the {cols} input features")
    n_groups = cols // G
    static = grouped and opts.static_groups
    if not grouped:
        of_column = torch.zeros(cols, dtype=torch.long, device=W.device)
    elif static and perm is not None:
        of_column = perm // G
    else:
        of_column = torch.arange(cols, device=W.device) // G
    return _Groups(
        args=args, mse=opts.mse, size=G, grouped=grouped, dynamic=grouped and not static,
        scale=torch.empty(rows, n_groups, dtype=W.dtype, device=W.device),
        zero=torch.empty(rows, n_groups, dtype=W.dtype, device=W.device),
        of_column=of_column, of_column_list=of_column.tolist())


def _fit_up_front(W: torch.Tensor, groups: _Groups, dead: torch.Tensor) -> int:
    """What precedes the column loop, in the natural column order: per channel, each row's
    parameters from the whole row (dead columns included); the dead columns zeroed in W;
    static groups, every group's parameters from these weights. Returns the number of
    dead columns."""
    if not groups.grouped:
        groups.fit(0, W)
    n_dead = int(dead.sum())
    if n_dead:
        W[:, dead] = 0
    if groups.grouped and not groups.dynamic:
        G = groups.size
        for g in range(W.shape[1] // G):
            groups.fit(g, W[:, g * G:(g + 1) * G])
    return n_dead


@dataclass
class _Block:
    """Columns ``start:stop`` (rows of W^T, processing order) of one lazy block: a working
    copy of their weights and their scaled errors, both (count, rows)."""

    start: int
    stop: int
    W: torch.Tensor
    Err: torch.Tensor


def _group_weights(Wt: torch.Tensor, U: torch.Tensor, block: _Block, i: int,
                   G: int) -> torch.Tensor:
    """The (G, rows) weights of the group starting at the block's column ``i`` as they stand
    now; columns past the block are first brought up to date with the block's errors."""
    col = block.start + i
    end = col + G
    if end <= block.stop:
        return block.W[i:end - block.start]
    rest = Wt[block.stop:end] - U[block.start:col, block.stop:end].t() @ block.Err[:i]
    return torch.cat([block.W[i:], rest], dim=0)


def _solve_block(Wt: torch.Tensor, Qt: torch.Tensor, U: torch.Tensor, start: int, stop: int,
                 groups: _Groups) -> torch.Tensor:
    """Quantize columns ``start:stop`` into ``Qt`` one at a time, each column's error fed
    back into the rest of the block at once; returns the block's scaled errors."""
    W1 = Wt[start:stop].clone()
    Err1 = torch.zeros_like(W1)
    block = _Block(start, stop, W1, Err1)
    U1 = U[start:stop, start:stop]
    diag = torch.diagonal(U1).tolist()
    bits = groups.args.bits
    G = groups.size
    with _one_thread():  # vector-sized ops: threading costs more than it gives
        for i in range(stop - start):
            col = start + i
            if groups.dynamic and col % G == 0:
                groups.fit(col // G, _group_weights(Wt, U, block, i, G).t())
            g = groups.of_column_list[col]
            w = W1[i]
            q = fake_quantize(w, groups.scale[:, g], groups.zero[:, g], bits)
            Qt[col] = q
            err = Err1[i]
            torch.sub(w, q, out=err)
            err.div_(diag[i])
            W1[i:].addr_(U1[i, i:], err, alpha=-1)
    return Err1


def _solve_columns(Wt: torch.Tensor, U: torch.Tensor, groups: _Groups,
                   block_size: int) -> torch.Tensor:
    """The error-feedback loop over W^T (a column of W per row, processing order) in lazy
    blocks: after each block one matmul updates the later columns. Updates ``Wt`` in place
    and returns Q^T."""
    cols = Wt.shape[0]
    Qt = torch.zeros_like(Wt)
    for start in range(0, cols, block_size):
        stop = min(start + block_size, cols)
        Err = _solve_block(Wt, Qt, U, start, stop, groups)
        if stop < cols:
            Wt[stop:].addmm_(U[start:stop, stop:].t(), Err, alpha=-1)
    return Qt


def _natural_order(Qt: torch.Tensor, perm: torch.Tensor | None,
                   of_column: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q in the original column order from Q^T in processing order, and g_idx."""
    Q = Qt.t().contiguous()
    if perm is None:
        return Q, of_column.to(torch.int32)
    Q = Q[:, torch.argsort(perm)]
    g_idx = torch.empty(Q.shape[1], dtype=torch.int32, device=Q.device)
    g_idx[perm] = of_column.to(torch.int32)
    return Q, g_idx


def _given_or_new_factor(H: torch.Tensor, opts: GPTQOptions, factor: HessianFactor | None,
                         linalg: Linalg | None, name: str) -> HessianFactor:
    if factor is None:
        return factor_hessian(H, opts, linalg=linalg, name=name)
    if factor.U.dtype != H.dtype or (factor.perm is not None) != opts.act_order:
        raise ValueError(f"{name}: the given Hessian factor is {factor.U.dtype} with "
                         f"act_order={factor.perm is not None}; the weight needs {H.dtype} "
                         f"with act_order={opts.act_order}")
    return factor


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    H: torch.Tensor,
    args: QuantArgs,
    options: GPTQOptions | None = None,
    *,
    linalg: Linalg | None = None,
    factor: HessianFactor | None = None,
    name: str = "linear",
    loss: bool = True,
) -> GPTQResult:
    """Quantize a (out, in) weight given its input Hessian; see the module docstring.

    ``options``: :class:`GPTQOptions` (its defaults when None). ``linalg``: where the
    factorisation runs (a qcore Backend; torch when None). ``factor``: :func:`factor_hessian`
    of this H with the same act_order and dampening (computed here when not given).
    ``loss=False`` skips the objective (NaN in the result): a caller that stacked several
    linears' rows scores each one itself."""
    opts = options if options is not None else GPTQOptions()
    if args.granularity not in ("channel", "group"):
        raise ValueError(f"{name}: GPTQ quantizes weights per channel or per group, not "
                         f"{args.granularity!r}")
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    W = weight.detach().to(dtype).clone()
    _, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"{name}: Hessian {tuple(H.shape)} does not match {cols} inputs")
    H0 = H.to(dtype)
    factor = _given_or_new_factor(H0, opts, factor, linalg, name)
    groups = _layout_groups(W, args, opts, factor.perm, name)
    n_dead = _fit_up_front(W, groups, factor.dead)
    if factor.perm is not None:
        W = W[:, factor.perm]
    # the solver works on W^T so that a column of W is one contiguous row in memory
    Wt = W.t().contiguous()
    del W
    Qt = _solve_columns(Wt, factor.U, groups, opts.block_size)
    del Wt
    Q, g_idx = _natural_order(Qt, factor.perm, groups.of_column)
    return GPTQResult(Q=Q, scale=groups.scale, zero=groups.zero, g_idx=g_idx,
                      perm=factor.perm, damp=factor.damp, damp_raises=factor.damp_raises,
                      dead=n_dead, loss=objective(weight, Q, H0) if loss else math.nan)
