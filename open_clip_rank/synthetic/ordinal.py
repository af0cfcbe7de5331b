"""A synthetic ordinal-regression dataset (no downloads needed): label r = an image with r shapes of one kind."""
import os
from typing import Dict

from ..files.atomic import atomic_write
from .counting import check_args, draw_counting_image, image_rng


def make_ordinal_dataset(root, num_ranks=6, train_per_rank=40, val_per_rank=12, image_size=32, seed=0,
                         kind='circle') -> Dict:
    """An ordinal-regression dataset: label r = an image with r shapes of ``kind`` (no distractors).

    Writes ``root/images/*.png`` and each split twice, as a CSV (``filepath<TAB>value``, absolute paths)
    and as an official OrdinalCLIP list file (``relative/path label`` per line, relative to ``root``).
    """
    check_args((kind,), num_ranks - 1, train_per_rank, val_per_rank)
    root = os.path.abspath(os.fspath(root))
    os.makedirs(os.path.join(root, 'images'), exist_ok=True)
    result = {'root': root, 'num_ranks': num_ranks}
    for split, per_rank in (('train', train_per_rank), ('val', val_per_rank)):
        rows = []
        for label in range(num_ranks):
            for index in range(per_rank):
                rng = image_rng(seed, kind, split, label, index)
                image, _ = draw_counting_image(rng, kind, label, image_size, max_shapes=num_ranks - 1)
                relative = os.path.join('images', f'{split}_{label:02d}_{index:03d}.png')
                image.save(os.path.join(root, relative), compress_level=1)
                rows.append((relative, label))
        with atomic_write(os.path.join(root, f'{split}.csv'), 'w') as f:
            f.write('filepath\tvalue\n' + ''.join(f'{os.path.join(root, p)}\t{v}\n' for p, v in rows))
        with atomic_write(os.path.join(root, f'{split}.txt'), 'w') as f:
            f.write(''.join(f'{p} {v}\n' for p, v in rows))
        result.update({f'{split}_csv': os.path.join(root, f'{split}.csv'),
                       f'{split}_list': os.path.join(root, f'{split}.txt'), f'num_{split}': len(rows)})
    return result
