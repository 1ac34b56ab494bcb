"""Exit policy for budgeted batch classification, as the official DVT release defines it (numpy only).

A DVT cascade lets each sample leave at the first exit whose confidence reaches that exit's
threshold; the last exit takes every sample left. The official ``inference.py`` picks the thresholds
on a held-out (training) split so that a chosen share of the samples leaves at each exit
(``dynamic_find_threshold``), then measures accuracy and expected cost on the test split
(``dynamic_evaluate``). This module reproduces both exactly (``../shared/conformance`` pins them)
and adds what deployment needs: a fast sweep over every budget, and the thresholds that fit a cost.

Exactness notes, all following the official float32 PyTorch pipeline:

* confidences are float32, and every threshold is one of them (or a sentinel), so ``>=`` comparisons
  are exact whatever produced the probabilities;
* sentinels: ``1e8`` for an exit that takes nobody on its own, ``-1e8`` for the last exit;
* :func:`budget_fractions` computes in float32, and the number of samples an exit should take is
  ``floor(n * fraction)`` in the fractions' own dtype, as ``math.floor(n_sample * p[k])`` does there.

The authors' MindSpore release (``dvt_inference.py``) runs the same search with three differences, all
available here as ``rule="mindspore"``:

* 39 budgets, ``p = 1 .. 39`` (``MINDSPORE_BUDGETS``), against the PyTorch release's 59;
* the fractions ``q_k`` are numpy float64 (``np.exp(np.log(p / 20) * k)``, normalised), so
  ``floor(n * q_k)`` can be one more or one less than with float32 where ``n * q_k`` lies within float32
  rounding of an integer (two exits, n = 9, p = 16: 5 samples against 4). That changes two-exit
  results, hence the option;
* a sample counts as taken by an earlier exit only when its confidence is strictly ``>`` that exit's
  threshold (the PyTorch release: ``>=``), so the sample that set the threshold, and its ties, are
  counted again by the next exit's search. With two exits there is no such next exit, so this never
  matters for that code's models; it is kept for cascades with more exits.

Evaluation (``>=`` at every exit, the last takes the rest) is the same in both.

The official search walks the samples one by one in Python; here each exit's confidences are sorted
once and every budget is a handful of vectorised passes over the presorted arrays (see
:func:`budget_sweep`; ``benchmarks/bench_policy.py`` measures the difference). Plain numpy, no
framework: it serves both backends.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

from dvt_core.errors import ArgumentError, InputError

CONFIDENCE_KINDS = ("max_softmax", "entropy")
#: Threshold of an exit that takes no sample on its own (nothing reaches it).
NEVER = np.float32(1e8)
#: Threshold of the last exit: every remaining sample leaves there.
ALWAYS = np.float32(-1e8)
#: Which release's threshold search: "pytorch" (the default) or "mindspore" (see the module notes).
RULES = ("pytorch", "mindspore")
#: Budget indices each release sweeps.
PYTORCH_BUDGETS = range(1, 60)
MINDSPORE_BUDGETS = range(1, 40)

__all__ = [
    "CONFIDENCE_KINDS",
    "RULES",
    "PYTORCH_BUDGETS",
    "MINDSPORE_BUDGETS",
    "NEVER",
    "ALWAYS",
    "BudgetSweep",
    "softmax",
    "confidence",
    "budget_fractions",
    "find_thresholds",
    "assign_exits",
    "evaluate",
    "budget_sweep",
    "anytime_accuracy",
    "thresholds_for_cost",
]


# --------------------------------------------------------------------------------------------------
# validation helpers


def _check_shape(values, name: str, axes: str, needs: str, error=ArgumentError) -> np.ndarray:
    """``values`` as an array with the axes ``axes`` names (``"(exits, samples)"``), none of them empty."""
    arr = np.asarray(values)
    if arr.ndim != axes.count(",") + 1:
        raise error(f"{name} must be shaped {axes}; got {arr.ndim} dimension(s) {arr.shape}")
    if 0 in arr.shape:
        raise error(f"{name} needs at least {needs}; got shape {arr.shape}")
    return arr


def _check_probs(probs, name: str = "probs") -> np.ndarray:
    """``probs`` as a floating array shaped (exits, samples, classes), with at least one of each."""
    arr = _check_shape(probs, name, "(exits, samples, classes)", "one exit, sample and class")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ArgumentError(f"{name} must hold floating-point values; got dtype {arr.dtype}")
    return arr


def _check_conf(conf, name: str = "confidences") -> np.ndarray:
    """Confidences as a finite float32 array shaped (exits, samples)."""
    arr = _check_shape(conf, name, "(exits, samples)", "one exit and one sample", InputError)
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise InputError(f"{name} contain NaN or infinite values (NaN or infinite logits: the weights or the "
                         "input are out of range)")
    return arr


def _check_targets(targets, n_samples: int, n_classes: int, name: str = "targets") -> np.ndarray:
    """Integer class labels shaped (samples,), each in ``[0, n_classes)``."""
    arr = np.asarray(targets)
    if arr.ndim != 1:
        raise ArgumentError(f"{name} must be shaped (samples,); got {arr.ndim} dimension(s) {arr.shape}")
    if arr.shape[0] != n_samples:
        raise ArgumentError(f"{name} has {arr.shape[0]} samples but the probabilities have {n_samples}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ArgumentError(f"{name} must be integer class indices; got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
        raise ArgumentError(f"{name} must lie in [0, {n_classes}); got range [{arr.min()}, {arr.max()}]")
    return arr


def _check_vector(values, n_exits: int, name: str) -> np.ndarray:
    """A finite 1-D array with one entry per exit."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ArgumentError(f"{name} must be 1-D (one value per exit); got shape {arr.shape}")
    if arr.shape[0] != n_exits:
        raise ArgumentError(f"{name} has {arr.shape[0]} values but there are {n_exits} exits")
    if not np.issubdtype(arr.dtype, np.number) or not np.isfinite(arr).all():
        raise ArgumentError(f"{name} must be finite numbers; got {arr!r}")
    return arr


def _check_fractions(fractions, n_exits: int) -> np.ndarray:
    """Per-exit shares of the samples: finite and non-negative (the last one is not used)."""
    arr = _check_vector(fractions, n_exits, "fractions")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    if (arr < 0).any():
        raise ArgumentError(f"fractions must be non-negative; got {arr!r}")
    return arr


def _exit_counts(n_samples: int, fractions: np.ndarray) -> np.ndarray:
    """How many samples each exit should take: ``floor(n * fraction)``, in the fractions' dtype.

    The official code multiplies a Python int by a float32 tensor element, so float32 fractions give a
    float32 product; this keeps that rounding (it decides the count when ``n * q`` is near an integer).
    """
    return np.floor(fractions * fractions.dtype.type(n_samples)).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# confidences


def softmax(logits, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax (the maximum is subtracted first, so large logits do not overflow)."""
    x = np.asarray(logits)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):  # inf logits give NaN here; callers refuse NaN by name
        z = np.exp(x - x.max(axis=axis, keepdims=True))
        return z / z.sum(axis=axis, keepdims=True)


def confidence(probs, kind: str = "max_softmax") -> np.ndarray:
    """Per-exit, per-sample confidence, shaped (exits, samples), float32; higher means more confident.

    ``probs`` are class probabilities shaped (exits, samples, classes) (use :func:`softmax` on logits).

    * ``"max_softmax"`` (official): the largest class probability.
    * ``"entropy"``: minus the entropy normalised by ``log(classes)``, in ``[-1, 0]``; 0 for a one-hot
      prediction, -1 for a uniform one. Negating keeps the single rule "exit when confidence >=
      threshold" for both kinds.

    The result is float32 because the official pipeline compares float32 values; a threshold picked
    from these confidences then compares exactly against them.
    """
    p = _check_probs(probs)
    if kind == "max_softmax":
        conf = p.max(axis=2)
    elif kind == "entropy":
        n_classes = p.shape[2]
        if n_classes < 2:
            raise ArgumentError("entropy confidence needs at least two classes")
        p64 = p.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            plogp = np.where(p64 > 0, p64 * np.log(p64), 0.0)
        conf = plogp.sum(axis=2) / np.log(n_classes)
    else:
        raise ArgumentError(f"unknown confidence kind {kind!r}; expected one of {CONFIDENCE_KINDS}")
    return _check_conf(conf)


def _confidences(probs_or_conf, kind: str) -> np.ndarray:
    """Confidences from probabilities (3-D) or as given (2-D)."""
    arr = np.asarray(probs_or_conf)
    if arr.ndim == 3:
        return confidence(arr, kind)
    if arr.ndim == 2:
        return _check_conf(arr)
    raise ArgumentError(
        "expected probabilities shaped (exits, samples, classes) or confidences shaped (exits, samples); "
        f"got {arr.ndim} dimension(s) {arr.shape}"
    )


# --------------------------------------------------------------------------------------------------
# budgets and thresholds


def _check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ArgumentError(f"unknown rule {rule!r}; expected one of {RULES}")
    return rule


def budget_fractions(p: float, num_exits: int, rule: str = "pytorch") -> np.ndarray:
    """Share of the samples each exit should take at budget index ``p``: ``q_k ∝ (p / 20) ** k``.

    ``k = 1 .. num_exits``, normalised to sum to 1. ``p < 20`` favours early exits (cheap), ``p > 20``
    late ones (accurate); the official sweep uses ``p = 1 .. 59``. Computed in float32 like the
    official ``torch.exp(torch.log(p / 20) * torch.range(1, n))``, so sample counts round the same way;
    ``rule="mindspore"``: in float64, as the MindSpore release's numpy code.
    """
    return _fractions_table(np.array([p], dtype=np.float64), num_exits, rule)[0]


def _fractions_table(budgets: np.ndarray, num_exits: int, rule: str = "pytorch") -> np.ndarray:
    """:func:`budget_fractions` of every budget index at once, float32 shaped (budgets, exits).

    Element-wise float32 arithmetic, so each row is bit-identical to a one-budget call.
    """
    if not np.isfinite(budgets).all() or (budgets <= 0).any():
        raise ArgumentError(f"budget indices must be positive numbers; got {budgets.tolist()!r}")
    if int(num_exits) != num_exits or num_exits < 1:
        raise ArgumentError(f"num_exits must be a positive integer; got {num_exits!r}")
    if _check_rule(rule) == "mindspore":
        base = (budgets / 20)[:, None]
        powers = np.exp(np.log(base) * np.arange(1, int(num_exits) + 1, dtype=np.float64))
        total = powers[:, :1].copy()
        for k in range(1, int(num_exits)):  # Python's sum(): left to right
            total += powers[:, k:k + 1]
        return powers / total
    base = (budgets / 20).astype(np.float32)[:, None]
    powers = np.exp(np.log(base) * np.arange(1, int(num_exits) + 1, dtype=np.float32))
    return powers / powers.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class _Presorted:
    """One exit-by-exit sort of a split's confidences, reused by every threshold search on it.

    Only the exits before the last are kept: the last exit's threshold is always ``ALWAYS``, so its
    confidences never matter. ``sorted_conf[k]`` holds exit ``k``'s confidences in falling order;
    ``earlier[k]`` (shaped ``(k, samples)``) the confidences of the exits before ``k`` for the same
    samples in the same order, so "which of these samples did an earlier exit take" is a contiguous
    comparison against the earlier thresholds, not a gather. How ties are ordered does not matter: a
    threshold is the value at a rank, the same for any order of equal values.
    """

    n_exits: int
    n_samples: int
    sorted_conf: np.ndarray
    earlier: tuple[np.ndarray, ...]


def _presort(probs: np.ndarray, kind: str) -> _Presorted:
    """Sort each exit's confidences once (all exits but the last)."""
    if kind not in CONFIDENCE_KINDS:
        raise ArgumentError(f"unknown confidence kind {kind!r}; expected one of {CONFIDENCE_KINDS}")
    n_exits, n_samples = probs.shape[:2]
    if n_exits == 1:
        return _Presorted(n_exits, n_samples, np.empty((0, n_samples), dtype=np.float32), ())
    conf = confidence(probs[:-1], kind)
    order = np.argsort(conf, axis=1)[:, ::-1]
    sorted_conf = np.take_along_axis(conf, order, axis=1)
    earlier = tuple(conf[:k, order[k]] for k in range(n_exits - 1))
    return _Presorted(n_exits, n_samples, sorted_conf, earlier)


def _thresholds_presorted(pre: _Presorted, counts: np.ndarray, strict: bool = False) -> np.ndarray:
    """Official threshold search on presorted confidences: a few O(samples) numpy passes per exit.

    Exit ``k`` gets the confidence of its ``counts[k]``-th sample, counting by falling confidence only
    the samples no earlier exit took (``NEVER`` if that count is 0 or more than the samples left). An
    earlier exit ``j`` took exactly the samples whose confidence there reaches ``thresholds[j]``
    (ties at a threshold included), so the samples left are those below every earlier threshold.
    ``strict`` (the MindSpore release): only confidences above an earlier threshold count as taken.
    """
    thresholds = np.full(pre.n_exits, NEVER, dtype=np.float32)
    thresholds[-1] = ALWAYS
    # Confidences are probabilities or normalised entropies (far below 1e8), so a NEVER exit takes
    # nobody and, until an exit gets a real threshold, the count-th sample left is the count-th one.
    anyone_taken = False
    for k in range(pre.n_exits - 1):
        count = int(counts[k])
        if count < 1 or count > pre.n_samples:
            continue
        if not anyone_taken:
            thresholds[k] = pre.sorted_conf[k, count - 1]
            anyone_taken = True
            continue
        below = np.less_equal if strict else np.less
        left = below(pre.earlier[k][0], thresholds[0])
        for j in range(1, k):
            left &= below(pre.earlier[k][j], thresholds[j])
        left_idx = left.nonzero()[0]
        if count <= left_idx.size:
            thresholds[k] = pre.sorted_conf[k, left_idx[count - 1]]
    return thresholds


def find_thresholds(probs, fractions, confidence_kind: str = "max_softmax", rule: str = "pytorch") -> np.ndarray:
    """Official ``dynamic_find_threshold``: per-exit thresholds, float32 shaped (exits,).

    ``fractions`` (one per exit; the last is not used) says which share of all samples each exit
    should take; exit ``k`` takes ``floor(n * fractions[k])`` of the samples earlier exits left, the
    most confident ones. Its threshold is the confidence of the last of them; ties with it leave too.
    An exit whose count is 0, or more than the samples left, gets ``NEVER`` (1e8); the last exit
    gets ``ALWAYS`` (-1e8). Each exit's confidences are sorted once; there is no per-sample loop.
    ``rule="mindspore"``: a sample counts as taken by an earlier exit only above its threshold.
    """
    p = _check_probs(probs)
    fr = _check_fractions(fractions, p.shape[0])
    return _thresholds_presorted(_presort(p, confidence_kind), _exit_counts(p.shape[1], fr),
                                 _check_rule(rule) == "mindspore")


def _assign(conf: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Exit index per sample: first exit whose confidence reaches its threshold; the last takes the rest."""
    exits = np.full(conf.shape[1], conf.shape[0] - 1, dtype=np.int64)
    for k in range(conf.shape[0] - 2, -1, -1):  # backwards, so the earliest exit reached wins
        exits[conf[k] >= thresholds[k]] = k
    return exits


def assign_exits(probs_or_conf, thresholds, confidence_kind: str = "max_softmax") -> np.ndarray:
    """Index of the exit each sample takes, int64 shaped (samples,).

    ``probs_or_conf`` is either probabilities (exits, samples, classes), turned into confidences of
    ``confidence_kind``, or confidences (exits, samples) as :func:`confidence` returns them. A sample
    leaves at the first exit whose confidence is ``>=`` that exit's threshold; the last exit takes
    every sample left, whatever its threshold (the official one is always -1e8 anyway).
    """
    conf = _confidences(probs_or_conf, confidence_kind)
    t = _check_vector(thresholds, conf.shape[0], "thresholds").astype(np.float32)
    return _assign(conf, t)


def _check_costs(costs, n_exits: int) -> np.ndarray:
    return _check_vector(costs, n_exits, "costs").astype(np.float64)


def evaluate(probs, targets, thresholds, costs, confidence_kind: str = "max_softmax") -> tuple[float, float]:
    """Official ``dynamic_evaluate``: ``(accuracy in percent, expected cost)`` of a threshold policy.

    Each sample is classified (argmax) at the exit :func:`assign_exits` gives it. ``costs[k]`` is the
    cumulative cost of leaving at exit ``k`` (e.g. GFLOPs of all stages up to it); the expected cost is
    ``sum_k share_k * costs[k]`` with ``share_k`` the share of samples leaving at ``k``, as officially
    (but in float64).
    """
    p = _check_probs(probs)
    n_exits, n_samples, n_classes = p.shape
    y = _check_targets(targets, n_samples, n_classes)
    c = _check_costs(costs, n_exits)
    t = _check_vector(thresholds, n_exits, "thresholds").astype(np.float32)
    conf, preds = _conf_and_preds(p, confidence_kind)
    return _tally(conf, preds == y, t, c)


def _conf_and_preds(probs: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Confidences (as :func:`confidence`) and argmax predictions, with one pass over the classes for
    max-softmax (the maximum is the probability at the argmax)."""
    preds = probs.argmax(axis=2)
    if kind != "max_softmax":
        return confidence(probs, kind), preds
    return _check_conf(np.take_along_axis(probs, preds[..., None], axis=2)[..., 0]), preds


def _tally(conf: np.ndarray, correct: np.ndarray, thresholds: np.ndarray,
           costs: np.ndarray) -> tuple[float, float]:
    """Accuracy (percent) and expected cost of a policy, counting each exit's leavers with masks.

    The sums are the official ones (hits * 100 / n, and sum over exits of share * cost), so
    :func:`evaluate` and :func:`budget_sweep` give bit-identical results.
    """
    n_exits, n_samples = conf.shape
    hits, cost = 0, 0.0
    left = np.ones(n_samples, dtype=bool)  # samples no earlier exit took
    for k in range(n_exits):
        if k < n_exits - 1:
            leave = conf[k] >= thresholds[k]
            leave &= left
            left ^= leave  # leave is a subset of left
        else:
            leave = left
        hits += int(np.count_nonzero(leave & correct[k]))
        cost += np.count_nonzero(leave) / n_samples * float(costs[k])
    return hits * 100.0 / n_samples, cost


def anytime_accuracy(probs, targets) -> np.ndarray:
    """Top-1 accuracy in percent of every exit on all samples, float64 shaped (exits,)."""
    p = _check_probs(probs)
    y = _check_targets(targets, p.shape[1], p.shape[2])
    return (p.argmax(axis=2) == y).mean(axis=1) * 100.0


# --------------------------------------------------------------------------------------------------
# budget sweep


@dataclass(frozen=True)
class BudgetSweep:
    """Thresholds and test-split results of one policy per budget index, all as arrays.

    Row ``i`` belongs to budget index ``budgets[i]``: ``fractions[i]`` the exit shares asked for,
    ``thresholds[i]`` (float32) those found on the train split, ``accuracy[i]`` (percent) and
    ``cost[i]`` (expected cost) measured on the test split.
    """

    budgets: np.ndarray      # (B,)
    fractions: np.ndarray    # (B, exits) float32 (float64 with rule="mindspore")
    thresholds: np.ndarray   # (B, exits) float32
    accuracy: np.ndarray     # (B,) percent
    cost: np.ndarray         # (B,)

    def __len__(self) -> int:
        return int(self.budgets.shape[0])


def budget_sweep(train_probs, train_targets, test_probs, test_targets, costs,
                 budgets: Optional[Iterable[float]] = None,
                 confidence_kind: str = "max_softmax", rule: str = "pytorch") -> BudgetSweep:
    """The official budgeted-batch evaluation for every budget index at once.

    For each ``p`` in ``budgets``: fractions from :func:`budget_fractions`, thresholds from
    :func:`find_thresholds` on the train split, accuracy and expected cost from :func:`evaluate` on the
    test split. The results are identical to calling those per budget, but the work that does not
    depend on the budget is done once: confidences, predictions and, above all, the per-exit sort of
    the train confidences. Each budget then costs a few O(samples) vectorised passes.

    ``train_targets`` are not used by the search (as in the official code) but are checked, so a
    mismatched split fails loudly. ``budgets`` defaults to the release's own sweep (``PYTORCH_BUDGETS`` or,
    with ``rule="mindspore"``, ``MINDSPORE_BUDGETS``).
    """
    if budgets is None:
        budgets = MINDSPORE_BUDGETS if _check_rule(rule) == "mindspore" else PYTORCH_BUDGETS
    tr = _check_probs(train_probs, "train_probs")
    te = _check_probs(test_probs, "test_probs")
    n_exits = tr.shape[0]
    if te.shape[0] != n_exits:
        raise ArgumentError(f"train_probs has {n_exits} exits but test_probs has {te.shape[0]}")
    _check_targets(train_targets, tr.shape[1], tr.shape[2], "train_targets")
    y_test = _check_targets(test_targets, te.shape[1], te.shape[2], "test_targets")
    c = _check_costs(costs, n_exits)
    budget_values = np.asarray(list(budgets), dtype=np.float64)
    if budget_values.ndim != 1 or budget_values.size == 0:
        raise ArgumentError("budgets must be a non-empty sequence of budget indices")

    presorted = _presort(tr, confidence_kind)
    test_conf, test_preds = _conf_and_preds(te, confidence_kind)
    test_correct = test_preds == y_test

    fractions = _fractions_table(budget_values, n_exits, rule)
    counts = _exit_counts(tr.shape[1], fractions)
    thresholds = np.empty(fractions.shape, dtype=np.float32)
    accuracy = np.empty(budget_values.size, dtype=np.float64)
    cost = np.empty(budget_values.size, dtype=np.float64)
    for i in range(budget_values.size):
        thresholds[i] = _thresholds_presorted(presorted, counts[i], rule == "mindspore")
        accuracy[i], cost[i] = _tally(test_conf, test_correct, thresholds[i], c)
    return BudgetSweep(budgets=budget_values, fractions=fractions, thresholds=thresholds,
                       accuracy=accuracy, cost=cost)


def thresholds_for_cost(sweep: BudgetSweep, max_cost: float) -> np.ndarray:
    """Thresholds of the most accurate budget whose expected cost is at most ``max_cost``.

    Among equally accurate budgets the cheaper one wins (then the first). Raises ``ValueError`` naming
    the cheapest achievable cost when no budget fits.
    """
    if not np.isfinite(max_cost):
        raise ArgumentError(f"max_cost must be a finite number; got {max_cost!r}")
    if len(sweep) == 0:
        raise ArgumentError("the sweep holds no budgets")
    fits = np.flatnonzero(sweep.cost <= max_cost)
    if fits.size == 0:
        cheapest = int(sweep.cost.argmin())
        raise ArgumentError(
            f"no budget has expected cost <= {max_cost:g}; the cheapest achievable is "
            f"{sweep.cost[cheapest]:.6g} (budget index {sweep.budgets[cheapest]:g})"
        )
    # lexsort: last key is primary -> highest accuracy, then lowest cost, then earliest row.
    best = fits[np.lexsort((fits, sweep.cost[fits], -sweep.accuracy[fits]))[0]]
    return sweep.thresholds[best].copy()
