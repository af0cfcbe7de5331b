"""open_clip_rank.evaluation.metrics against scipy.stats and naive references."""
import itertools
import math
import warnings

import numpy as np
import pytest
from scipy import stats

from open_clip_rank.evaluation import metrics
from open_clip_rank.evaluation.metrics import (
    METRIC_NAMES, format_metrics_table, krcc, mae, pairwise_accuracy, plcc, ranking_metrics,
    round_predictions, srcc)

pytestmark = pytest.mark.unit

TOL = 1e-10


def _cases():
    """(name, pred, target): continuous, ordinal targets with heavy ties, tied predictions, tiny n."""
    rng = np.random.default_rng(0)
    out = []
    for n in (2, 3, 10, 257, 2000):
        target = rng.normal(size=n)
        out.append((f'continuous-{n}', target + rng.normal(size=n), target))
        ordinal = rng.integers(0, 10, size=n).astype(float)
        out.append((f'ordinal-{n}', ordinal + rng.normal(scale=3, size=n), ordinal))
        out.append((f'tied-both-{n}', np.round(ordinal + rng.normal(scale=2, size=n)), ordinal))
        out.append((f'coarse-pred-{n}', rng.integers(0, 3, size=n).astype(float), rng.normal(size=n)))
    out.append(('anti', np.arange(50.0), -np.arange(50.0)))
    out.append(('two-levels', np.r_[np.zeros(30), np.ones(30)], np.r_[np.zeros(20), np.ones(40)]))
    return out


CASES = _cases()
IDS = [c[0] for c in CASES]


def _skip_if_constant(pred, target):
    if np.ptp(pred) == 0 or np.ptp(target) == 0:
        pytest.skip('constant input (covered by the degenerate tests)')


SCIPY_REFERENCES = {'srcc': (srcc, stats.spearmanr), 'krcc': (krcc, stats.kendalltau), 'plcc': (plcc, stats.pearsonr)}


@pytest.mark.parametrize('metric', sorted(SCIPY_REFERENCES))
@pytest.mark.parametrize('name,pred,target', CASES, ids=IDS)
def test_correlations_match_scipy(name, pred, target, metric):
    _skip_if_constant(pred, target)
    ours, reference = SCIPY_REFERENCES[metric]
    assert ours(pred, target) == pytest.approx(reference(pred, target).statistic, abs=TOL)


@pytest.mark.parametrize('name,pred,target', CASES, ids=IDS)
def test_mae_matches_numpy(name, pred, target):
    assert mae(pred, target) == pytest.approx(np.mean(np.abs(pred - target)), abs=TOL)


def _naive_pair_acc(pred, target):
    agree = pairs = 0.0
    for i, j in itertools.combinations(range(len(pred)), 2):
        if target[i] == target[j]:
            continue
        pairs += 1
        d = (pred[i] - pred[j]) * (target[i] - target[j])
        agree += 1.0 if d > 0 else 0.5 if pred[i] == pred[j] else 0.0
    return agree / pairs if pairs else math.nan


@pytest.mark.parametrize('name,pred,target', [c for c in CASES if len(c[1]) <= 300],
                         ids=[c[0] for c in CASES if len(c[1]) <= 300])
def test_pairwise_accuracy_matches_double_loop(name, pred, target):
    expected = _naive_pair_acc(pred, target)
    got = pairwise_accuracy(pred, target)
    if math.isnan(expected):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(expected, abs=TOL)


def test_pairwise_accuracy_simple_values():
    assert pairwise_accuracy([1, 2, 3], [10, 20, 30]) == 1.0
    assert pairwise_accuracy([3, 2, 1], [10, 20, 30]) == 0.0
    assert pairwise_accuracy([5, 5, 5], [1, 2, 3]) == 0.5  # prediction ties count half
    assert pairwise_accuracy([1, 2, 3, 0], [0, 0, 1, 1]) == 0.5  # target ties skipped: 4 pairs, 2 agree


def test_count_inversions_matches_naive():
    rng = np.random.default_rng(1)
    for n in (0, 1, 2, 5, 31, 64, 100):
        a = rng.integers(0, 7, size=n)
        naive = sum(int(a[i] > a[j]) for i in range(n) for j in range(i + 1, n))
        assert metrics._count_inversions(a) == naive


def test_large_n_matches_scipy():
    rng = np.random.default_rng(2)
    n = 20000
    target = rng.integers(0, 10, size=n).astype(float)
    pred = target + rng.normal(scale=3, size=n)
    tau = krcc(pred, target)
    acc = pairwise_accuracy(pred, target)
    assert tau == pytest.approx(stats.kendalltau(pred, target).statistic, abs=TOL)
    assert 0.5 < acc < 1.0


def _categorised(seed=3):
    rng = np.random.default_rng(seed)
    names = np.array(['dogs', 'cats', 'birds', 'ants'])
    cats = names[rng.integers(0, len(names), size=400)]
    target = rng.integers(0, 10, size=400).astype(float)
    pred = target + rng.normal(scale=2, size=400)
    return pred, target, cats


def test_ranking_metrics_structure_and_means():
    pred, target, cats = _categorised()
    out = ranking_metrics(pred, target, list(cats))
    categories = sorted(set(cats))
    per_category_keys = [f'{c}/{m}' for c in categories for m in METRIC_NAMES]
    assert set(out) == {*METRIC_NAMES, *per_category_keys, 'num_samples', 'num_categories'}
    assert [k for k in out if '/' in k] == per_category_keys  # sorted categories, metric order
    assert out['num_samples'] == 400 and out['num_categories'] == 4
    assert all(isinstance(v, float) for v in out.values())
    for m in METRIC_NAMES:
        assert out[m] == pytest.approx(np.mean([out[f'{c}/{m}'] for c in categories]), abs=TOL)
    for c in categories:
        mask = cats == c
        assert out[f'{c}/srcc'] == pytest.approx(stats.spearmanr(pred[mask], target[mask]).statistic, abs=TOL)
        assert out[f'{c}/krcc'] == pytest.approx(stats.kendalltau(pred[mask], target[mask]).statistic, abs=TOL)
        assert out[f'{c}/pair_acc'] == pytest.approx(pairwise_accuracy(pred[mask], target[mask]), abs=TOL)


def test_ranking_metrics_without_categories():
    pred, target, _ = _categorised()
    out = ranking_metrics(pred, target)
    assert out['num_categories'] == 1
    for m in METRIC_NAMES:
        assert out[m] == out[f'all/{m}']
    assert out['plcc'] == pytest.approx(stats.pearsonr(pred, target).statistic, abs=TOL)


def test_ranking_metrics_mean_skips_nan_categories():
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        out = ranking_metrics([1.0, 2.0, 3.0, 7.0], [1.0, 2.0, 4.0, 5.0], ['a', 'a', 'a', 'single'])
    assert math.isnan(out['single/srcc'])
    assert out['srcc'] == out['a/srcc'] == pytest.approx(1.0)
    assert out['mae'] == pytest.approx(np.mean([out['a/mae'], out['single/mae']]))


def test_ranking_metrics_all_nan_gives_nan():
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        out = ranking_metrics([1.0, 2.0], [3.0, 4.0], ['a', 'b'])
    for m in ('srcc', 'krcc', 'plcc', 'pair_acc'):
        assert math.isnan(out[m])
    assert out['mae'] == pytest.approx(2.0)


def test_integer_categories_as_str():
    out = ranking_metrics([1, 2, 3, 4], [1, 2, 3, 4], np.array([1, 1, 0, 0]))
    assert '0/srcc' in out and '1/srcc' in out


DEGENERATE = [
    ('empty', [], []),
    ('single', [1.0], [2.0]),
    ('constant-pred', [1.0, 1.0, 1.0], [1.0, 2.0, 3.0]),
    ('constant-target', [1.0, 2.0, 3.0], [5.0, 5.0, 5.0]),
    ('both-constant', [1.0, 1.0], [2.0, 2.0]),
    ('nan-input', [1.0, float('nan'), 3.0], [1.0, 2.0, 3.0]),
]


@pytest.mark.parametrize('name,pred,target', DEGENERATE, ids=[d[0] for d in DEGENERATE])
def test_degenerate_inputs_are_nan_without_warnings(name, pred, target):
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        for fn in (srcc, krcc, plcc):
            assert math.isnan(fn(pred, target)), fn.__name__
        acc = pairwise_accuracy(pred, target)
        m = mae(pred, target)
        out = ranking_metrics(pred, target)
        format_metrics_table(out)
    if name == 'constant-pred':
        assert acc == 0.5  # every comparable pair is a prediction tie
    else:
        assert math.isnan(acc)
    assert math.isnan(m) == (name in ('empty', 'nan-input'))
    assert out['num_samples'] == len(pred)


@pytest.mark.parametrize('fn', [srcc, krcc, plcc, mae, pairwise_accuracy])
def test_length_mismatch_raises(fn):
    with pytest.raises(ValueError, match=r'5.*4'):
        fn(np.zeros(5), np.zeros(4))


def test_ranking_metrics_length_mismatch_names_all_lengths():
    with pytest.raises(ValueError, match=r'3.*3.*2'):
        ranking_metrics([1, 2, 3], [1, 2, 3], ['a', 'b'])
    with pytest.raises(ValueError, match=r'3.*2'):
        ranking_metrics([1, 2, 3], [1, 2])


def test_torch_tensor_inputs():
    import torch
    pred, target, cats = _categorised()
    expected = ranking_metrics(pred, target, list(cats))
    ids = {c: i for i, c in enumerate(sorted(set(cats)))}
    got = ranking_metrics(torch.tensor(pred, requires_grad=True), torch.tensor(target), list(cats))
    assert got == expected
    pred32 = torch.tensor(pred, dtype=torch.float32)
    assert srcc(pred32, torch.tensor(target)) == srcc(pred32.numpy(), target)
    assert math.isfinite(krcc(torch.tensor(pred, dtype=torch.bfloat16), torch.tensor(target)))
    by_id = ranking_metrics(torch.tensor(pred), torch.tensor(target),
                            torch.tensor([ids[c] for c in cats]))
    assert by_id['num_categories'] == 4 and '0/srcc' in by_id


def test_round_predictions():
    np.testing.assert_array_equal(round_predictions([0.4, 0.6, 2.5, -1.2]), [0.0, 1.0, 2.0, -1.0])
    assert round_predictions(np.array([[1.4], [2.6]])).shape == (2,)


def test_format_metrics_table():
    pred, target, cats = _categorised()
    out = ranking_metrics(pred, target, list(cats))
    table = format_metrics_table({'epoch': 3, **out})
    lines = table.splitlines()
    assert lines[0].split() == ['category', *METRIC_NAMES]
    body = [line.split() for line in lines[2:]]
    assert [row[0] for row in body] == [*sorted(set(cats)), 'mean']
    assert body[-1][1:] == [f'{out[m]:.3f}' for m in METRIC_NAMES]
    assert len({len(line) for line in lines}) == 1  # fixed width


def test_official_pairwise_accuracy_restates_the_original_formula():
    """The original: np.tril_indices(n, k=1) of (pred_j - pred_i >= 0) == (target_j - target_i >= 0)."""
    from open_clip_rank.evaluation.metrics import official_pairwise_accuracy
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 37):
        pred = rng.integers(0, 4, n).astype(float)  # ties on both sides
        target = rng.integers(0, 4, n).astype(float)
        u = target[None, :] - target[:, None]
        v = pred[None, :] - pred[:, None]
        i, j = np.tril_indices(n, k=1)
        expected = np.mean((v[i, j] >= 0) == (u[i, j] >= 0))
        assert official_pairwise_accuracy(pred, target, block=3) == pytest.approx(expected)
    # by hand: n = 3, pred = (0, 1, 2), target = (0, 2, 1); pairs (0,0) (0,1) (1,0) (1,1) (1,2) (2,0) (2,1) (2,2)
    # agree: diag x3, (0,1) yes, (1,0) yes, (1,2) pred +1 target -1: no, (2,0) yes, (2,1) pred -1 target +1: no
    assert official_pairwise_accuracy([0, 1, 2], [0, 2, 1]) == pytest.approx(6 / 8)


def test_ordinal_metrics_by_hand():
    from open_clip_rank.evaluation.ordinal import ordinal_metrics
    out = ordinal_metrics(expected=[0.4, 2.6, 1.5], argmax=[0, 3, 2], labels=[0, 2, 2])
    assert out['mae_exp'] == pytest.approx((0.4 + 0.6 + 0.5) / 3)
    assert out['acc_exp'] == pytest.approx(2 / 3)  # rounded 0, 3, 2 (1.5: half to even) against 0, 2, 2
    assert out['mae_max'] == pytest.approx(1 / 3) and out['acc_max'] == pytest.approx(2 / 3)


def test_prototype_ordinality_as_the_official_definition():
    """Per row i, the share of columns j >= i (j < R-1) with sim(i, j) > sim(i, j+1)."""
    import numpy as np
    from open_clip_rank.evaluation.ordinal import prototype_ordinality
    angles = np.linspace(0, np.pi / 2, 5)  # prototypes along an arc: similarity falls with rank distance
    arc = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    assert prototype_ordinality(arc) == 1.0
    # ranks 1 and 2 swapped: R = 4 gives the pairs (i, j) = (0,0) (0,1) (0,2) (1,1) (1,2) (2,2), i.e. 6 checks
    swapped = np.stack([arc[0], arc[2], arc[1], arc[3]])
    sim = swapped @ swapped.T
    by_hand = np.mean([sim[i, j] > sim[i, j + 1] for i in range(3) for j in range(i, 3)])
    assert by_hand < 1.0 and prototype_ordinality(swapped) == pytest.approx(by_hand)
