"""Ranking metrics for validation: SRCC, KRCC, PLCC, MAE and pairwise accuracy.

numpy only, so evaluation never needs scipy at runtime; the tests check every correlation against
``scipy.stats`` to 1e-10. Inputs may be lists, numpy arrays or torch tensors (torch is never
imported here). Degenerate inputs (fewer than two samples, a constant input, a NaN anywhere) give
``nan`` silently instead of scipy's warnings, because a validation split with one image in some
category is normal and must not flood the training log.

Kendall tau-b and pairwise accuracy both come from one O(n log n) pair count (concordant,
discordant and tied pairs, as in Knight's algorithm), so they stay fast for tens of thousands of
images without materialising an n x n matrix.
"""
import math

import numpy as np

METRIC_NAMES = ('srcc', 'krcc', 'plcc', 'mae', 'pair_acc', 'pair_acc_official')
_NAN = float('nan')


def as_array(x):
    """1-D float64 array from a list, numpy array or torch tensor (any device, any dtype)."""
    if hasattr(x, 'detach'):  # torch tensor, without importing torch
        x = x.detach().cpu()
        if x.dtype.is_floating_point and x.element_size() < 4:
            x = x.double()  # numpy has no bfloat16
        x = x.numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def check_lengths(**named):
    """Raise a ValueError naming every length when they differ (a silent broadcast would be wrong)."""
    lengths = {name: len(value) for name, value in named.items()}
    if len(set(lengths.values())) > 1:
        detail = ', '.join(f'{name}={n}' for name, n in lengths.items())
        raise ValueError(f"inputs must have the same length, got {detail}")


def _pair(pred, target):
    pred, target = as_array(pred), as_array(target)
    check_lengths(pred=pred, target=target)
    return pred, target


def _degenerate(x, y):
    """True where no correlation is defined: n < 2 or NaN present (scipy returns nan there too)."""
    return len(x) < 2 or bool(np.isnan(x).any() or np.isnan(y).any())


def _is_constant(x):
    return bool((x == x[0]).all())


def _pearson(x, y):
    """Pearson r computed like scipy.stats.pearsonr (centred, rescaled, clipped) so they agree to ~1e-15."""
    if _degenerate(x, y) or _is_constant(x) or _is_constant(y):
        return _NAN
    with np.errstate(all='ignore'):
        xm, ym = x - x.mean(), y - y.mean()
        xm /= np.abs(xm).max()  # rescale first: avoids overflow in the norm for huge values
        ym /= np.abs(ym).max()
        r = float(np.dot(xm / np.linalg.norm(xm), ym / np.linalg.norm(ym)))
    return min(1.0, max(-1.0, r)) if math.isfinite(r) else _NAN


def _average_ranks(x):
    """1-based ranks where tied values share the mean of their ranks (scipy.stats.rankdata 'average')."""
    n = len(x)
    order = np.argsort(x, kind='stable')
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    bounds = np.r_[starts, n]
    mean_rank = (bounds[:-1] + bounds[1:] + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, np.diff(bounds))
    return ranks


def _tied_pairs(run_starts, n):
    """Number of pairs inside runs of equal values, given a boolean 'run starts here' mask."""
    counts = np.diff(np.r_[np.flatnonzero(run_starts), n]).astype(np.int64)
    return int((counts * (counts - 1) // 2).sum())


def _count_inversions(a):
    """Pairs i < j with a[i] > a[j], for non-negative ints, by a vectorised bottom-up merge sort.

    Each pass merges neighbouring sorted blocks of width w: tagging values with their block id makes
    all left halves one sorted array, so ``searchsorted`` counts, for every right-half element, the
    larger left-half elements of its own block. O(n log^2 n) in numpy calls, no Python loop over n.
    """
    n = len(a)
    if n < 2:
        return 0
    a = a.astype(np.int64)
    m = int(a.max()) + 1
    idx = np.arange(n)
    total, w = 0, 1
    while w < n:
        block = idx // (2 * w)
        right = (idx // w) % 2 == 1
        keys = block * m + a
        left_keys = keys[~right]
        lo = np.searchsorted(left_keys, keys[right], side='right')
        hi = np.searchsorted(left_keys, (block[right] + 1) * m, side='left')
        total += int((hi - lo).sum())
        a = np.sort(keys) - block * m  # block b's keys stay at block b's positions
        w *= 2
    return total


def _pair_counts(x, y):
    """(total, tied in x, tied in y, tied in both, discordant) pair counts, in O(n log n)."""
    n = len(x)
    order = np.lexsort((y, x))  # by x, then y: inside an x tie y ascends, so no false inversions
    xs, ys = x[order], y[order]
    x_starts = np.r_[True, xs[1:] != xs[:-1]]
    joint_starts = x_starts | np.r_[True, ys[1:] != ys[:-1]]
    _, y_dense, y_counts = np.unique(ys, return_inverse=True, return_counts=True)
    y_counts = y_counts.astype(np.int64)
    total = n * (n - 1) // 2
    x_tie = _tied_pairs(x_starts, n)
    y_tie = int((y_counts * (y_counts - 1) // 2).sum())
    xy_tie = _tied_pairs(joint_starts, n)
    discordant = _count_inversions(y_dense.reshape(-1))
    return total, x_tie, y_tie, xy_tie, discordant


def _kendall_from_counts(total, x_tie, y_tie, xy_tie, discordant):
    """Tau-b: (concordant - discordant) / sqrt(pairs untied in x * pairs untied in y)."""
    if x_tie == total or y_tie == total:  # a constant input
        return _NAN
    con_minus_dis = total - x_tie - y_tie + xy_tie - 2 * discordant
    tau = con_minus_dis / math.sqrt(total - x_tie) / math.sqrt(total - y_tie)
    return min(1.0, max(-1.0, tau))


def _pair_acc_from_counts(total, x_tie, y_tie, xy_tie, discordant):
    """Agreeing pairs among pairs with distinct targets; a prediction tie is a coin flip (0.5)."""
    comparable = total - y_tie
    if comparable == 0:
        return _NAN
    concordant = total - x_tie - y_tie + xy_tie - discordant
    pred_tied_only = x_tie - xy_tie
    return (concordant + 0.5 * pred_tied_only) / comparable


def srcc(pred, target) -> float:
    """Spearman rank correlation: Pearson of average ranks, as scipy.stats.spearmanr."""
    x, y = _pair(pred, target)
    if _degenerate(x, y):
        return _NAN
    return _pearson(_average_ranks(x), _average_ranks(y))


def krcc(pred, target) -> float:
    """Kendall tau-b, as scipy.stats.kendalltau's default (ties corrected on both sides)."""
    x, y = _pair(pred, target)
    if _degenerate(x, y):
        return _NAN
    return _kendall_from_counts(*_pair_counts(x, y))


def plcc(pred, target) -> float:
    """Pearson linear correlation, as scipy.stats.pearsonr."""
    return _pearson(*_pair(pred, target))


def mae(pred, target) -> float:
    """Mean absolute error; nan for empty input (without numpy's empty-mean warning)."""
    x, y = _pair(pred, target)
    return float(np.abs(x - y).mean()) if len(x) else _NAN


def pairwise_accuracy(pred, target) -> float:
    """Fraction of pairs with distinct targets that the prediction orders the same way.

    Pairs tied in the target carry no order and are skipped; a tie in the prediction scores 0.5,
    so a constant predictor scores exactly 0.5 rather than 0 or 1. nan when no pair is comparable.
    """
    x, y = _pair(pred, target)
    if _degenerate(x, y):
        return _NAN
    return _pair_acc_from_counts(*_pair_counts(x, y))


def official_pairwise_accuracy(pred, target, block: int = 2048) -> float:
    """The official code's pairwise "accuracy", for comparing with the paper's tables (not ``pair_acc``).

    Over the index pairs of ``np.tril_indices(n, k=1)`` (the lower triangle *with* the diagonal and the first
    super-diagonal), the share where (pred_j - pred_i >= 0) equals (target_j - target_i >= 0): ties in either
    count as ">=", and the n diagonal pairs always agree. Computed in row blocks (no n x n matrix).
    """
    x, y = _pair(pred, target)
    n = len(x)
    if n == 0:
        return _NAN
    agree = total = 0
    for start in range(0, n, block):
        i = np.arange(start, min(start + block, n))[:, None]
        j = np.arange(n)[None, :]
        inside = j <= i + 1  # tril_indices(n, k=1)
        same = (x[None, :] - x[i] >= 0) == (y[None, :] - y[i] >= 0)
        agree += int((same & inside).sum())
        total += int(inside.sum())
    return agree / total


def round_predictions(pred) -> np.ndarray:
    """Nearest integer (half to even), for comparing scores with ordinal targets such as 0..9."""
    return np.rint(as_array(pred))


def _all_metrics(x, y):
    """Every metric of METRIC_NAMES for one group, sharing the pair count between krcc and pair_acc."""
    if _degenerate(x, y):
        tau = acc = _NAN
    else:
        counts = _pair_counts(x, y)
        tau, acc = _kendall_from_counts(*counts), _pair_acc_from_counts(*counts)
    return {
        'srcc': srcc(x, y),
        'krcc': tau,
        'plcc': plcc(x, y),
        'mae': mae(x, y),
        'pair_acc': acc,
        # no pairs (one row), or a NaN: undefined like the others, so the mean over categories leaves it out
        # (the official formula alone would give a lone image's category 1.0: its diagonal pair always agrees)
        'pair_acc_official': _NAN if _degenerate(x, y) else official_pairwise_accuracy(x, y),
    }


def _nanmean(values):
    """Mean of the non-nan values; nan if there are none (np.nanmean would warn)."""
    finite = [v for v in values if not math.isnan(v)]
    return float(sum(finite) / len(finite)) if finite else _NAN


def _category_names(categories, n):
    if categories is None:
        return np.full(n, 'all')
    if hasattr(categories, 'detach'):
        categories = categories.detach().cpu()
    if hasattr(categories, 'tolist'):
        categories = categories.tolist()
    return np.asarray([str(c) for c in categories], dtype=str).reshape(-1)


def ranking_metrics(preds, targets, categories=None) -> dict:
    """Flat dict of floats for results.jsonl / tensorboard.

    Ranking is judged within a category (scores of different prompts are not comparable), so each
    metric is computed per category (``'{category}/{metric}'``, categories sorted by name) and the
    headline ``'{metric}'`` is the mean over categories, skipping categories where it is undefined (nan:
    every metric but MAE in a one-row category, which has no pairs; nan when no category defines it).
    ``categories=None`` treats everything as one category named ``'all'``.
    """
    x, y = _pair(preds, targets)
    names = _category_names(categories, len(x))
    if categories is not None:
        check_lengths(preds=x, targets=y, categories=names)
    unique, inverse = np.unique(names, return_inverse=True)
    inverse = inverse.reshape(-1)
    per_category = {}
    for i, name in enumerate(unique.tolist()):
        mask = inverse == i
        per_category[name] = _all_metrics(x[mask], y[mask])
    out = {metric: _nanmean([m[metric] for m in per_category.values()]) for metric in METRIC_NAMES}
    for name, values in per_category.items():
        out.update({f'{name}/{metric}': value for metric, value in values.items()})
    out['num_samples'] = float(len(x))
    out['num_categories'] = float(len(per_category))
    return out


def format_metrics_table(metrics: dict, metric_names=METRIC_NAMES) -> str:
    """Fixed-width text table of a ``ranking_metrics`` dict: one row per category, then 'mean'.

    Keys that are not ``'{category}/{metric}'`` or a bare metric (epoch, counts) are ignored, so the
    dict logged by evaluation can be passed as is. ``metric_names``: the columns (default: all).
    """
    columns = tuple(metric_names)
    rows = {}
    for key, value in metrics.items():
        category, _, metric = key.rpartition('/')
        if category and metric in columns:
            rows.setdefault(category, {})[metric] = value
    rows['mean'] = {m: metrics[m] for m in columns if m in metrics}
    name_width = max(len('category'), *(len(name) for name in rows))
    widths = [max(len(m), 7) for m in columns]
    header = 'category'.ljust(name_width) + ''.join(f'  {m:>{w}}' for m, w in zip(columns, widths))
    lines = [header, '-' * len(header)]
    for name, values in rows.items():
        cells = []
        for metric, width in zip(columns, widths):
            value = values.get(metric)
            cells.append(f'  {"-":>{width}}' if value is None else f'  {float(value):>{width}.3f}')
        lines.append(name.ljust(name_width) + ''.join(cells))
    return '\n'.join(lines)
