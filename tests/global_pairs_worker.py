"""Two gloo processes train one step of a tiny adapter with ``--rank-global-pairs`` (run by test_global_pairs.py).

``python global_pairs_worker.py OUT PORT``: OUT/single_<case>.pt holds the single-process loss terms and
parameter gradients on the whole batch (default per-batch pairs, N = 8); each rank r runs the same step under
DDP (gloo, static graph, as ``--csv-dataset-sample-type rank`` trains) on its half with global pairs and saves
its loss terms and its (DDP-averaged) parameter gradients to OUT/<case>_rank<r>.pt.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import open_clip
import open_clip_rank  # noqa: F401
from open_clip_rank.losses.ranking import RankingLoss
from open_clip_rank.data.batches import RankTexts

WORLD, LOCAL = 2, 4
COMPONENTS = ('rank', 'regression', 'bce')
# case -> (loss head, ignore ties, gather with grad)
CASES = {'dual': ('dual', False, False), 'dual_grad': ('dual', False, True), 'dual_ties': ('dual', True, False),
         'single': ('single', False, False), 'single_grad': ('single', False, True)}


def model():
    open_clip.add_model_config(Path(__file__).resolve().parent / 'model_configs')
    torch.manual_seed(0)
    net = open_clip.create_model('tiny-vit-adapter')
    return net.eval()  # dropout off: the processes and the single run must compute the same function


def batch():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(WORLD * LOCAL, 3, 32, 32, generator=g)
    tokens = torch.randint(1, 400, (WORLD * LOCAL, 16), generator=g)
    tokens[:, 10] = 49407  # an end-of-text token
    targets = torch.tensor([3., 0., 1., 3., 2., 1., 0., 5.])  # ties within and across the halves
    return images, tokens, targets


def step(net, loss, images, tokens, targets, global_pairs):
    texts = RankTexts(tokens, targets, torch.zeros(len(targets), dtype=torch.long), loss.head == 'dual', global_pairs)
    out = loss(**net(images, texts), output_dict=True)
    sum(out.values()).backward()
    inner = getattr(net, 'module', net)
    grads = {name: p.grad.detach().clone() for name, p in inner.named_parameters() if p.grad is not None}
    return {'terms': {k: v.detach() for k, v in out.items()}, 'grads': grads}


def worker(rank, out, port):
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=WORLD)
    torch.manual_seed(100 + rank)
    images, tokens, targets = batch()
    rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
    for case, (head, ties, with_grad) in CASES.items():
        net = torch.nn.parallel.DistributedDataParallel(model(), static_graph=True)
        loss = RankingLoss(head, COMPONENTS, ignore_ties=ties, global_pairs=True, gather_with_grad=with_grad,
                           rank=rank, world_size=WORLD)
        result = step(net, loss, images[rows], tokens[rows], targets[rows], True)
        torch.save(result, f'{out}/{case}_rank{rank}.pt')
    dist.barrier()
    dist.destroy_process_group()


def main(out, port):
    torch.set_num_threads(1)
    images, tokens, targets = batch()
    for case, (head, ties, _) in CASES.items():
        loss = RankingLoss(head, COMPONENTS, ignore_ties=ties)
        torch.save(step(model(), loss, images, tokens, targets, False), f'{out}/single_{case}.pt')
    mp.spawn(worker, args=(out, port), nprocs=WORLD, join=True)


if __name__ == '__main__':
    main(sys.argv[1], int(sys.argv[2]))
