"""--rank-global-pairs: one category per step on every rank, the gathered pair loss equals the single-process loss
on the concatenated batch (values and DDP-averaged gradients, 2 gloo processes), flag validation."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import run_gloo_worker, write_rank_csv
from open_clip_rank.data import RankBatchSampler, RankTable
from open_clip_rank.losses import create_loss
from open_clip_rank.losses.ranking import RankingLoss
from open_clip_rank.data.batches import RankTexts

WORKER = Path(__file__).resolve().parent / 'global_pairs_worker.py'
sys.path.insert(0, str(WORKER.parent))
import global_pairs_worker  # noqa: E402

CASES = tuple(global_pairs_worker.CASES)


def _table(sizes):
    ids = np.concatenate([np.full(n, c) for c, n in enumerate(sizes)])
    names = [f'cat{c}' for c in range(len(sizes))]
    return RankTable([f'/x/{i}.png' for i in range(len(ids))], [f'Rank the numbers of {names[c]}.' for c in ids],
                     ids, names, np.arange(len(ids), dtype=float) % 7, None, 'test.csv')


# --- sampler --------------------------------------------------------------------------------------------------

@pytest.mark.unit
def test_every_rank_gets_the_same_category_per_step_and_disjoint_rows():
    table, world, batch = _table([60, 50, 45, 40]), 4, 6
    plans = [RankBatchSampler(table, batch, 0.25, seed=3, rank=r, world_size=world, global_pairs=True,
                              relevance_max=5).plan(2) for r in range(world)]
    assert len({len(p) for p in plans}) == 1 and len(plans[0]) == len(table) // (batch * world)
    categories_seen = set()
    for step in zip(*plans):
        assert all(len(b) == batch for b in step)
        # the batch category: positives' own category (key -1), negatives carry it explicitly
        categories = {int(table.category_ids[row]) if cat == -1 else cat for b in step for row, cat, _ in b}
        assert len(categories) == 1
        categories_seen |= categories
        assert len({ref for b in step for _, _, ref in b}) == 1  # one reference value per step too
        rows = [row for b in step for row, _, _ in b]
        assert len(rows) == len(set(rows))  # disjoint across ranks
        negatives = sum(cat != -1 for b in step for _, cat, _ in b)
        assert negatives == batch * world - int(batch * world * 0.75)  # the ratio holds for the global batch
    assert len(categories_seen) > 1
    again = RankBatchSampler(table, batch, 0.25, seed=3, rank=1, world_size=world, global_pairs=True,
                             relevance_max=5).plan(2)
    assert again == plans[1]  # deterministic for (seed, epoch, rank)
    assert again != RankBatchSampler(table, batch, 0.25, seed=3, rank=1, world_size=world, global_pairs=True,
                                     relevance_max=5).plan(3)


@pytest.mark.unit
def test_global_plan_with_one_process_is_the_default_plan():
    table = _table([40, 30])
    default = RankBatchSampler(table, 8, 0.25, seed=5).plan(1)
    assert RankBatchSampler(table, 8, 0.25, seed=5, global_pairs=True).plan(1) == default


# --- model outputs and the one-process loss --------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize('head', ['dual', 'single'])
def test_one_process_global_pairs_equal_the_default_loss(head):
    net = global_pairs_worker.model()
    images, tokens, targets = global_pairs_worker.batch()
    texts = lambda global_pairs: RankTexts(tokens, targets, torch.zeros(8, dtype=torch.long), head == 'dual',
                                           global_pairs)
    default, summaries = net(images, texts(False)), net(images, texts(True))
    assert 'pair_summaries' not in default and 'pair_logits_between' not in default
    if head == 'dual':
        assert 'pair_logits' not in summaries
        pairs = summaries['pair_logits_between'](summaries['pair_summaries'], summaries['pair_summaries'])
        torch.testing.assert_close(pairs, default['pair_logits'])
    torch.testing.assert_close(summaries['rank_scores'], default['rank_scores'])
    components = global_pairs_worker.COMPONENTS
    expected = RankingLoss(head, components)(**default, output_dict=True)
    got = RankingLoss(head, components, global_pairs=True)(**summaries, output_dict=True)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])


# --- two processes ---------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp('global_pairs')
    run_gloo_worker(WORKER, out, [f'single_{case}' for case in CASES] + [f'{case}_rank{r}' for case in CASES
                                                                          for r in range(2)])
    return lambda name: torch.load(out / f'{name}.pt')


@pytest.mark.e2e
@pytest.mark.distributed
@pytest.mark.parametrize('case', CASES)
def test_two_processes_equal_one_process_on_the_concatenated_batch(results, case):
    """Loss: the ranks' mean is the single-process value; gradients after DDP's averaging (gloo, static graph)
    are the single-process gradients, every parameter (towers, adapter, pair head)."""
    single = results(f'single_{case}')
    ranks = [results(f'{case}_rank{r}') for r in (0, 1)]
    assert single['terms'].keys() == ranks[0]['terms'].keys() == {'rank_loss', 'regression_loss', 'bce_loss'}
    for name, value in single['terms'].items():
        torch.testing.assert_close((ranks[0]['terms'][name] + ranks[1]['terms'][name]) / 2, value,
                                   rtol=1e-6, atol=1e-6)
    assert single['grads'].keys() == ranks[0]['grads'].keys()
    if case.startswith('dual'):
        assert any(name.startswith('adapter.pair_regressor') for name in single['grads'])
    for name, grad in single['grads'].items():
        torch.testing.assert_close(ranks[0]['grads'][name], grad, rtol=1e-4, atol=5e-6, msg=name)
        assert torch.equal(ranks[0]['grads'][name], ranks[1]['grads'][name])


# --- flags ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def rank_csv(tmp_path_factory):
    return write_rank_csv(tmp_path_factory.mktemp('global_pairs_csv'), counts=range(2), per_count=1)


def _parse(csv, *extra):
    import open_clip_train.params
    argv = ['--model', 'tiny-vit-adapter', '--train-data', csv, '--dataset-type', 'csv', '--csv-separator', '\t',
            '--csv-dataset-sample-type', 'rank', '--batch-size', '4', *extra]
    return open_clip_train.params.parse_args(argv)


@pytest.mark.unit
def test_flag_builds_a_global_pair_loss(rank_csv):
    args = _parse(rank_csv, '--rank-global-pairs', '--loss-opt', 'dual-head', '--gather-with-grad')
    args.rank, args.world_size = 1, 4
    loss = create_loss(args)
    assert (loss.global_pairs, loss.gather_with_grad, loss.rank, loss.world_size) == (True, True, 1, 4)
    default = _parse(rank_csv)
    default.rank, default.world_size = 0, 2
    assert default.rank_global_pairs is False and create_loss(default).global_pairs is False


@pytest.mark.unit
@pytest.mark.parametrize('extra, message', [
    (('--accum-freq', '2'), 'accum-freq'),
    (('--csv-dataset-sample-type', 'default', '--loss-opt', 'rankclip'), 'csv-dataset-sample-type rank'),
    (('--horovod',), 'horovod'),
])
def test_flag_refuses_what_it_cannot_do(rank_csv, extra, message, capsys):
    with pytest.raises(SystemExit):
        _parse(rank_csv, '--rank-global-pairs', *extra)
    assert message in capsys.readouterr().err
