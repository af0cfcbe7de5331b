"""Ranking losses: official values, options, and OpenCLIP's --accum-freq procedure."""
import pytest
import torch
import torch.nn.functional as F

from open_clip_rank.losses.ranking import RankingLoss

pytestmark = pytest.mark.unit


def _outputs(n, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, generator=g).requires_grad_(requires_grad)
    pairs = torch.randn(n, n, generator=g).requires_grad_(requires_grad)
    targets = torch.randint(0, 4, (n,), generator=g).float()
    return scores, pairs, targets


def test_components_and_weights_match_definitions():
    s, p, y = _outputs(6)
    loss = RankingLoss('dual', ['regression', 'rank', 'bce'], weights={'regression': 0.5, 'rank': 2.0, 'bce': 3.0})
    parts = loss(rank_scores=s, pair_logits=p, targets=y, output_dict=True)
    labels = (y[:, None] > y[None, :]).float()
    torch.testing.assert_close(parts['rank_loss'], 2.0 * F.binary_cross_entropy_with_logits(p, labels))
    torch.testing.assert_close(parts['regression_loss'], 0.5 * torch.log(1 + F.smooth_l1_loss(s, y)))
    torch.testing.assert_close(parts['bce_loss'], 3.0 * F.binary_cross_entropy_with_logits(s, (y != 0).float()))
    single = RankingLoss('single', ['rank'])(rank_scores=s, targets=y, output_dict=True)['rank_loss']
    torch.testing.assert_close(single, F.binary_cross_entropy_with_logits(s[:, None] - s[None, :], labels))


def test_ignore_ties_uses_only_ordered_pairs():
    s, p, y = _outputs(8, seed=2)
    mask = y[:, None] != y[None, :]
    labels = (y[:, None] > y[None, :]).float()
    got = RankingLoss('dual', ['rank'], ignore_ties=True)(rank_scores=s, pair_logits=p, targets=y)
    torch.testing.assert_close(got, F.binary_cross_entropy_with_logits(p[mask], labels[mask]))
    all_tied = RankingLoss('dual', ['rank'], ignore_ties=True)(
        rank_scores=s, pair_logits=p.clone().requires_grad_(), targets=torch.ones(8))
    assert all_tied.item() == 0.0 and all_tied.requires_grad


def test_missing_targets_and_bad_options_are_clear():
    s, p, _ = _outputs(4)
    with pytest.raises(ValueError, match='need targets'):
        RankingLoss()(rank_scores=s)
    with pytest.raises(ValueError, match='invalid'):
        RankingLoss(components=['rank', 'listwise'])
    with pytest.raises(ValueError, match='pair_logits'):
        RankingLoss('dual', ['rank'])(rank_scores=s, targets=torch.zeros(4))


@pytest.mark.parametrize('head', ['dual', 'single'])
def test_openclip_accumulation_gives_gradient_of_mean_micro_batch_loss(head):
    """Replays open_clip_train's --accum-freq procedure: cached outputs of all micro-batches,
    one micro-batch recomputed with grad at a time, its slice concatenated among the others."""
    k, b = 3, 5
    loss = RankingLoss(head, ['regression', 'rank', 'bce'], micro_batch_size=b)
    micro = [_outputs(b, seed=j, requires_grad=True) for j in range(k)]
    cached = {'rank_scores': [m[0].detach() for m in micro], 'pair_logits': [m[1].detach() for m in micro],
              'targets': [m[2] for m in micro]}
    for j in range(k):
        live = {'rank_scores': micro[j][0], 'pair_logits': micro[j][1], 'targets': micro[j][2]}
        inputs = {key: torch.cat(cached[key][:j] + [live[key]] + cached[key][j + 1:]) for key in cached}
        loss(**inputs).backward()
    expected = [(s.detach().clone().requires_grad_(), p.detach().clone().requires_grad_(), y) for s, p, y in micro]
    mean = sum(RankingLoss(head, ['regression', 'rank', 'bce'])(rank_scores=s, pair_logits=p, targets=y)
               for s, p, y in expected) / k
    mean.backward()
    for (s, p, _), (es, ep, _) in zip(micro, expected):
        torch.testing.assert_close(s.grad, es.grad)
        if head == 'dual':
            torch.testing.assert_close(p.grad, ep.grad)
