"""Two gloo processes on the CPU compute RankCLIP's loss on halves of one batch (run by test_rankclip_ddp.py).

``python rankclip_ddp_worker.py OUT PORT``: for each distribution mode every rank saves its loss terms and
the gradients of its own rows to OUT/<mode>_rank<r>.pt; OUT/single.pt holds the single-process loss and
gradients on the whole batch. The batch has repeated images and captions, so the ranking targets have
ties and the tie-break permutation decides the value.
"""
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import open_clip_rank  # noqa: F401
from open_clip_rank.losses.rankclip import RankCLIPLoss

BATCH, DIM, WORLD = 12, 8, 2
MODES = {'global': dict(), 'gather_with_grad': dict(gather_with_grad=True),
         'local': dict(local_loss=True), 'local_gather_with_grad': dict(local_loss=True, gather_with_grad=True)}


def batch():
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(BATCH, DIM, generator=generator)
    text = image + 0.7 * torch.randn(BATCH, DIM, generator=generator)
    image[7] = image[1]  # one image on each rank, the same picture
    text[9] = text[2]    # and a repeated caption across ranks
    text[4] = text[3]    # and one within rank 0
    return (torch.nn.functional.normalize(image, dim=-1), torch.nn.functional.normalize(text, dim=-1),
            torch.tensor(100.0))


def loss_and_grads(loss, image, text, scale):
    image, text = image.clone().requires_grad_(), text.clone().requires_grad_()
    out = loss(image, text, scale, output_dict=True)
    sum(out.values()).backward()
    return {'terms': {k: v.detach() for k, v in out.items()}, 'image_grad': image.grad, 'text_grad': text.grad}


def make_loss(**kwargs):
    loss = RankCLIPLoss(seed=11, **kwargs)
    loss.set_epoch(10, 10)
    return loss


def worker(rank, out, port):
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=WORLD)
    torch.manual_seed(rank)  # different global RNG states: the tie permutation must not depend on them
    image, text, scale = batch()
    rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    for mode, kwargs in MODES.items():
        loss = make_loss(rank=rank, world_size=WORLD, **kwargs)
        torch.save(loss_and_grads(loss, image[rows], text[rows], scale), f'{out}/{mode}_rank{rank}.pt')
    dist.barrier()
    dist.destroy_process_group()


def main(out, port):
    image, text, scale = batch()
    torch.save(loss_and_grads(make_loss(), image, text, scale), f'{out}/single.pt')
    mp.spawn(worker, args=(out, port), nprocs=WORLD, join=True)


if __name__ == '__main__':
    main(sys.argv[1], int(sys.argv[2]))
