"""Every MindSpore quirk the DVT backend depends on, in one place.

The rest of ``dvt_backends/mindspore`` builds layers and runs tensor maths only through this module, so a
MindSpore upgrade (or a missing CPU kernel) is dealt with here and nowhere else. What it covers:

* **GELU**: ``nn.GELU`` defaults to the tanh approximation; DVT (and its spec) use the exact erf form.
* **LayerNorm**: ``nn.LayerNorm`` takes a shape tuple and ``epsilon`` (default 1e-7, not torch's 1e-5)
  and names its affine parameters ``gamma`` / ``beta`` (``LN_WEIGHT`` / ``LN_BIAS``; dvt_core.checkpoint.naming
  maps them to torch's ``weight`` / ``bias``).
* **Conv2d**: defaults to ``pad_mode="same"`` and no bias; we ask for torch's explicit padding, a bias
  and torch's default initialisation (kaiming-uniform a=sqrt(5), bias U(+-1/sqrt(fan_in))).
* **Missing CPU kernels**: ``ops.einsum`` and the functional ``ops.layer_norm`` have none on CPU, so
  every contraction is a (batched) matmul (``matmul``, ``matmul_nt``, ``matmul_tn``).
* **Slow CPU kernels**: transposes / strided copies (~10x torch's), broadcast BatchMatMul, broadcasting
  Add (``bias_add`` uses BiasAdd) and Div.
  ``linear_rows`` / ``linear_cols`` (per-head projections that stay contiguous), ``LeftMatmul`` (a
  fixed matrix along axis -2 as a 1x1 convolution), ``channel_mix`` and the exact GELU avoid them.
* **unfold / dropout / random masks / dtypes**: thin wrappers with torch's argument conventions.

Execution: MindSpore 2.x starts in PyNative mode, which this backend uses by default. On CPU, PyNative
dispatches every operator through an asynchronous pipeline of threads; for the small kernels of a DVT
that hand-off costs more than the kernel (about 20x on a busy 2-core machine), so ``configure_runtime``
switches CPU PyNative to synchronous launch (``ms.runtime.launch_blocking``) when a model is built.
``jit`` compiles a function in graph mode where the caller asks for it.
"""
from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import nn, ops
from mindspore.common.initializer import HeUniform, Orthogonal, TruncatedNormal, Uniform, initializer

from dvt_core.model.recipe import INIT_STD, TRUNC_BOUND

FLOAT = ms.float32  # parameters and activations
INDEX = ms.int32  # row indices for gather
LN_WEIGHT, LN_BIAS = "gamma", "beta"  # nn.LayerNorm's parameter leaves

Cell = nn.Cell
CellList = nn.CellList

# ---- dtypes and conversion ---------------------------------------------------------------------------


def to_tensor(array, dtype=FLOAT) -> ms.Tensor:
    """A numpy array (or nested list) as a MindSpore tensor of ``dtype`` (a copy)."""
    return ms.Tensor(np.ascontiguousarray(np.asarray(array)), dtype=dtype)


def to_numpy(t) -> np.ndarray:
    """A MindSpore tensor as a numpy array (float32 stays float32)."""
    return t.asnumpy()


def index_tensor(rows) -> ms.Tensor:
    return ms.Tensor(np.asarray(rows, dtype=np.int32), dtype=INDEX)


def is_tensor(x) -> bool:
    return isinstance(x, ms.Tensor)


def shape_of(x) -> tuple:
    return tuple(int(s) for s in x.shape)


def set_param(p: ms.Parameter, value: np.ndarray) -> None:
    """Replace a Parameter's data with ``value`` (cast to the parameter's dtype, shape unchanged)."""
    p.set_data(ms.Tensor(np.ascontiguousarray(np.asarray(value)), dtype=p.dtype))


# ---- parameters and initialisation ---------------------------------------------------------------------


def trunc_normal_param(shape, std: float, requires_grad: bool = True) -> ms.Parameter:
    """Parameter ~ N(0, std) truncated to +-TRUNC_BOUND (timm's trunc_normal_ with its absolute bounds)."""
    return ms.Parameter(initializer(_trunc_normal(std), tuple(shape), FLOAT), requires_grad=requires_grad)


def array_param(array: np.ndarray, requires_grad: bool = True) -> ms.Parameter:
    return ms.Parameter(to_tensor(array), requires_grad=requires_grad)


def orthogonal_param(shape, gain: float, requires_grad: bool = True) -> ms.Parameter:
    """A (semi-)orthogonal matrix times ``gain`` (torch's orthogonal_ followed by a scale)."""
    return ms.Parameter(initializer(Orthogonal(gain=gain), tuple(shape), FLOAT), requires_grad=requires_grad)


# ---- layers -------------------------------------------------------------------------------------------


def _trunc_normal(std: float) -> TruncatedNormal:
    return TruncatedNormal(sigma=std, a=-TRUNC_BOUND, b=TRUNC_BOUND)


def dense(in_features: int, out_features: int, bias: bool = True, std: float = INIT_STD) -> nn.Dense:
    """nn.Dense (weight (out, in), like torch's Linear) with trunc-normal weights and zero bias."""
    return nn.Dense(in_features, out_features, weight_init=_trunc_normal(std), bias_init="zeros",
                    has_bias=bias)


def layer_norm(dim: int, eps: float) -> nn.LayerNorm:
    """LayerNorm over the last axis with an explicit epsilon (parameters ``gamma`` ones / ``beta`` zeros)."""
    return nn.LayerNorm((dim,), begin_norm_axis=-1, begin_params_axis=-1, gamma_init="ones", beta_init="zeros",
                        epsilon=float(eps))


_INV_SQRT2 = 1.0 / math.sqrt(2.0)


class ExactGELU(nn.Cell):
    """GELU(x) = x * (1 + erf(x / sqrt(2))) / 2, the exact (erf) form, as torch computes it.

    ``nn.GELU(approximate=False)`` gives the same values but divides by ``sqrt(2)`` with MindSpore's
    CPU Div kernel, which costs more than the erf itself (about half the GELU time of a DVT forward);
    this multiplies by the reciprocal instead.
    """

    def construct(self, x):
        return x * (ops.erf(x * _INV_SQRT2) + 1.0) * 0.5  # the 0.5 is exact: same bits as torch's order


def gelu(flavour: str = "exact") -> nn.Cell:
    """The spec's GELU: "exact" (erf; MindSpore's own exact nn.GELU is slower) or "tanh" (nn.GELU's default
    tanh approximation, as torch's ``GELU(approximate="tanh")``)."""
    if flavour == "tanh":
        return nn.GELU(approximate=True)
    return ExactGELU()


def conv2d(in_chans: int, out_chans: int, kernel: int, stride: int = 1, padding: int = 0) -> nn.Conv2d:
    """Conv2d with torch's semantics: explicit zero padding, a bias, torch's default initialisation."""
    fan_in = in_chans * kernel * kernel
    return nn.Conv2d(in_chans, out_chans, kernel_size=kernel, stride=stride,
                     pad_mode="pad" if padding else "valid", padding=padding, has_bias=True,
                     weight_init=HeUniform(negative_slope=math.sqrt(5)), bias_init=Uniform(1 / math.sqrt(fan_in)))


def dropout(p: float) -> nn.Dropout:
    """Dropout with drop probability ``p`` (MindSpore 1.x took ``keep_prob``)."""
    return nn.Dropout(p=float(p))


# ---- tensor maths (matmul replacements for kernels the CPU lacks) ---------------------------------------

_matmul_nt = ops.BatchMatMul(transpose_b=True)
_matmul_tn = ops.BatchMatMul(transpose_a=True)
_matmul2_nt = ops.MatMul(transpose_b=True)
_matmul2 = ops.MatMul()


def matmul(a, b):
    """``a @ b`` with numpy broadcasting (a 2-D ``a`` or ``b`` applies to every batch)."""
    return ops.matmul(a, b)


def matmul_nt(a, b):
    """``a @ b^T`` over the last two axes, without materialising the transpose.

    Equal-rank batches go to BatchMatMul; a 2-D ``b`` (a weight) folds ``a``'s batch into rows.
    """
    if b.ndim == 2:
        lead = a.shape[:-1]
        out = _matmul2_nt(a.reshape(-1, a.shape[-1]), b)
        return out.reshape(*lead, b.shape[0])
    return _matmul_nt(a, b)


class LeftMatmul(nn.Cell):
    """``m @ x`` for a fixed 2-D ``m`` (N, n) and a batch ``x`` (..., n, K) -> (..., N, K).

    ``ops.matmul`` broadcasts ``m`` into a BatchMatMul over every leading index, which is slow on CPU
    for the small matrices of DVT's grid resizes (about 5-15x slower than torch here). Seen as a 1x1
    convolution with ``n`` input and ``N`` output channels over a (K, 1) "image" per leading index, it
    is one well-tuned kernel with no transpose, and gives the same sums. ``m`` is a constant tensor.
    """

    def __init__(self, m: np.ndarray):
        super().__init__()
        self.n_out, self.n_in = (int(v) for v in m.shape)
        self.matrix = to_tensor(m)
        self.kernel = to_tensor(np.asarray(m).reshape(self.n_out, self.n_in, 1, 1))
        self.conv = ops.Conv2D(out_channel=self.n_out, kernel_size=1)

    def construct(self, x):
        lead, k = x.shape[:-2], x.shape[-1]
        y = self.conv(x.reshape(-1, self.n_in, k, 1), self.kernel)
        return y.reshape(lead + (self.n_out, k))


_bias_add = ops.BiasAdd()


def bias_add(x2d, bias):
    """``x2d + bias`` along the last axis of a 2-D ``x2d``; the broadcasting Add is ~10x slower on CPU."""
    return _bias_add(x2d, bias)


def linear_rows(x2d, weight, bias, start: int, size: int):
    """Output features ``start:start+size`` of a Dense layer: ``x2d @ weight[start:start+size]^T + bias``.

    Slicing the (small) weight rather than the (large) output keeps every result contiguous: on
    MindSpore's CPU a strided copy of an activation costs ~10x a contiguous one, so per-head
    projections beat one wide projection followed by a transpose.
    """
    y = _matmul2_nt(x2d, weight[start:start + size])
    return y if bias is None else bias_add(y, bias[start:start + size])


def linear_cols(x2d, weight, start: int, size: int):
    """``x2d @ weight[:, start:start+size]^T``: one input slice of a Dense layer (no bias)."""
    return _matmul2_nt(x2d, weight[:, start:start + size])


def channel_mix(conv, x2d):
    """A 1x1 convolution applied to a channel-major (C_in, L) matrix: ``W (C_out, C_in) @ x + b``."""
    w = conv.weight.reshape(conv.weight.shape[0], -1)
    y = _matmul2(w, x2d)
    return _bias_add(y.reshape(1, *y.shape), conv.bias).reshape(y.shape)


def matmul_tn(a, b):
    """``a^T @ b`` over the last two axes (equal-rank batches)."""
    return _matmul_tn(a, b)


def softmax(x, axis: int = -1):
    return ops.softmax(x, axis=axis)


def unfold(x, kernel: int, stride: int, padding: int):
    """torch.nn.functional.unfold: (B, C, H, W) -> (B, C*k*k, L), channel-major, same order as torch."""
    return ops.unfold(x, kernel, dilation=1, padding=padding, stride=stride)


def cat(tensors, axis: int):
    return ops.cat(tuple(tensors), axis=axis)


def stack(tensors, axis: int = 0):
    return ops.stack(tuple(tensors), axis=axis)


def swap_last(x):
    return ops.swapaxes(x, -1, -2)


def broadcast_to(x, shape):
    return ops.broadcast_to(x, tuple(shape))


def gather_rows(x, rows: ms.Tensor, axis: int = 0):
    """Entries ``rows`` (an int tensor) of ``x`` along ``axis`` (the batch axis)."""
    return ops.gather(x, rows, axis)


def exp(x):
    return ops.exp(x)


def reciprocal(x):
    return ops.reciprocal(x)


def cross_entropy(logits, targets, label_smoothing: float = 0.0):
    """Mean cross entropy over the batch (integer class targets)."""
    return ops.cross_entropy(logits, targets.astype(INDEX), reduction="mean", label_smoothing=float(label_smoothing))


def bernoulli_rows(batch: int, ndim: int, keep: float, dtype=FLOAT):
    """(batch, 1, ..., 1) mask of ones with probability ``keep`` (stochastic depth)."""
    u = ops.rand((batch,) + (1,) * (ndim - 1), dtype=dtype)
    return ops.floor(u + keep)


# ---- execution ------------------------------------------------------------------------------------------


def configure_runtime() -> None:
    """Synchronous operator launch for CPU PyNative (once per process; MindSpore offers no way back).

    Set ``DVT_MINDSPORE_ASYNC=1`` to keep MindSpore's asynchronous pipeline.
    """
    import os

    if os.environ.get("DVT_MINDSPORE_ASYNC") == "1":
        return
    if ms.get_context("device_target") != "CPU" or is_graph_mode():
        return
    conf = getattr(ms.runtime, "launch_blocking", None)
    if conf is not None:
        conf()
    else:  # MindSpore < 2.5
        ms.set_context(pynative_synchronize=True)


def is_graph_mode() -> bool:
    return ms.get_context("mode") == ms.GRAPH_MODE


def jit(fn):
    """Compile ``fn`` in graph mode (``ms.jit``), whatever the global mode."""
    return ms.jit(fn)


def device_available(target: str) -> bool:
    """Whether this MindSpore build can run on "CPU", "GPU" or "Ascend" here (its probe's log muted)."""
    if target == "CPU":
        return True
    import logging

    from mindspore import log

    logger = log._get_logger()
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        from mindspore import hal

        return bool(hal.is_available(target))
    except Exception:  # an old build without mindspore.hal, or a probe that fails: not usable
        return False
    finally:
        logger.setLevel(level)


def check_device_target(target: str) -> None:
    """InputError when this MindSpore build cannot use ``target`` here."""
    if not device_available(target):
        from dvt_core.errors import InputError

        raise InputError(f"device {target} asked for, but this MindSpore build cannot use it here "
                         f"(MindSpore {ms.__version__}; use --device cpu, or install MindSpore's {target} build)")


def set_device_target(target: str) -> None:
    """Run on "CPU", "GPU" or "Ascend" from now on (MindSpore's device is process-wide context);
    InputError when this build cannot use that device."""
    check_device_target(target)
    ms.set_context(device_target=target)
