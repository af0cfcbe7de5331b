"""RankCLIP across 2 gloo processes equals the single-process loss on the concatenated batch."""
from pathlib import Path

import pytest
import torch

from helpers import run_gloo_worker
from rankclip_ddp_worker import MODES

pytestmark = [pytest.mark.e2e, pytest.mark.distributed]

WORKER = Path(__file__).resolve().parent / 'rankclip_ddp_worker.py'


@pytest.fixture(scope='module')
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp('rankclip_ddp')
    run_gloo_worker(WORKER, out, ['single'] + [f'{mode}_rank{r}' for mode in MODES for r in range(2)])

    def load(name):
        return torch.load(out / f'{name}.pt')
    return load


def _rows(rank):
    return slice(rank * 6, (rank + 1) * 6)


@pytest.mark.parametrize('rank', [0, 1])
def test_global_lists_equal_the_single_process_loss_and_local_row_gradients(results, rank):
    """Default (features gathered without gradient, own rows live): same value, same gradients of own rows."""
    single, ddp = results('single'), results(f'global_rank{rank}')
    assert ddp['terms']['crossmodal_rank_loss'] > 0 and ddp['terms']['inmodal_rank_loss'] > 0
    for name, value in single['terms'].items():
        torch.testing.assert_close(ddp['terms'][name], value, rtol=1e-6, atol=1e-6)
    for grad in ('image_grad', 'text_grad'):
        torch.testing.assert_close(ddp[grad], single[grad][_rows(rank)], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('mode', ['gather_with_grad', 'local_gather_with_grad'])
def test_gather_with_grad_sums_every_ranks_gradient(results, mode):
    """--gather-with-grad (with or without --local-loss): gradients flow back to every rank, so each rank's
    rows get world_size x the single-process gradient (DDP then averages over the ranks, as for ClipLoss)."""
    single = results('single')
    for rank in (0, 1):
        ddp = results(f'{mode}_rank{rank}')
        for grad in ('image_grad', 'text_grad'):
            torch.testing.assert_close(ddp[grad], 2 * single[grad][_rows(rank)], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('mode', ['local', 'local_gather_with_grad'])
def test_local_loss_averages_to_the_global_loss(results, mode):
    """--local-loss: each rank's own rows against all columns; the ranks' mean is the global loss."""
    single = results('single')
    ranks = [results(f'{mode}_rank{rank}') for rank in (0, 1)]
    assert not torch.equal(ranks[0]['terms']['contrastive_loss'], ranks[1]['terms']['contrastive_loss'])
    for name, value in single['terms'].items():
        torch.testing.assert_close((ranks[0]['terms'][name] + ranks[1]['terms'][name]) / 2, value,
                                   rtol=1e-6, atol=1e-6)
