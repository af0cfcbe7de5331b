"""The 'ordinal' sample type's training flags: the paper's data experiments, the official preprocessing and the
ordinality's rank window (declared in ``builtin.py``; the data builder and validation read them).

* ``--ordinal-few-shot N``: N training images per rank (the official ``few_shot.num_shots``);
* ``--ordinal-label-shift K --ordinal-label-shift-scale F``: the K ranks with the most training images keep a
  share F of them (the official ``label_distributed_shift``);
* ``--ordinal-long-tail [MIN_RANK]``: validation on the images labelled MIN_RANK or more (the official
  ``use_long_tail``: 50);
* ``--ordinal-official-transforms``: the official preprocessing instead of OpenCLIP's;
* ``--ordinal-rank-window LO HI``: the prototypes' ordinality over ranks LO..HI (the official MORPH figures: 15 75).

The subsets follow the official data module: images are grouped by their evaluation label (the middle one of a
list-file line) in order of first appearance, a subset image keeps that one label, and ranks with fewer images
than asked keep all of theirs. Draws come from one ``random.Random(--seed)`` (few-shot first, then the shift), so
every process of a run builds the same subset; the counts per rank before and after are logged.
"""
import logging
import random
from typing import Dict, List, Optional

from .ordinal_dataset import OrdinalTable
from .table import RankDataError

_logger = logging.getLogger(__name__)

OFFICIAL_LONG_TAIL_MIN_RANK = 50  # the official generate_long_tail keeps labels >= 50
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the official transforms_cfg pixel_mean / pixel_std
IMAGENET_STD = (0.229, 0.224, 0.225)
OFFICIAL_RESIZE_RATIO = 256 / 224  # the official input_resize 256 for input_size 224


# --- flags ------------------------------------------------------------------------------------------------

def add_ordinal_data_args(parser):
    group = parser.add_argument_group('open_clip_rank: ordinal data (--csv-dataset-sample-type ordinal)')
    group.add_argument(
        '--ordinal-few-shot', type=int, default=0, metavar='N',
        help='Train on N images per rank (the official few_shot.num_shots), drawn with --seed; a rank with fewer '
             'keeps all of its images. Images are grouped by their evaluation label (a list file\'s middle one), '
             'which is the one label they keep. CSV / list-file data. Default 0: all training images.')
    group.add_argument(
        '--ordinal-label-shift', type=int, default=0, metavar='K',
        help='Label distribution shift (the official label_distributed_shift.num_topk_scaled_class): the K ranks '
             'with the most training images (ties: first seen first) keep a share --ordinal-label-shift-scale of '
             'them (at least one), drawn with --seed, after --ordinal-few-shot. CSV / list-file data. Default 0: off.')
    group.add_argument(
        '--ordinal-label-shift-scale', type=float, default=None, metavar='F',
        help='Share of images the --ordinal-label-shift ranks keep, in (0, 1) (the official scale_factor; its '
             'configs use 0.1 and 0.2). Required with --ordinal-label-shift.')
    group.add_argument(
        '--ordinal-long-tail', type=int, nargs='?', const=OFFICIAL_LONG_TAIL_MIN_RANK, default=None,
        metavar='MIN_RANK',
        help='Validate on the long tail only (the official use_long_tail): the --val-data images whose evaluation '
             f'label is MIN_RANK or more (default when given without a value: {OFFICIAL_LONG_TAIL_MIN_RANK}, the '
             'official). CSV / list-file data. Default: every validation image.')
    group.add_argument(
        '--ordinal-official-transforms', action='store_true', default=False,
        help='The official OrdinalCLIP preprocessing instead of OpenCLIP\'s: training resizes to 256x256 (the input '
             'size x 8/7, aspect not kept), takes a random 224 crop and flips at random; validation resizes the same '
             'way and takes the centre crop; both normalise with ImageNet\'s mean and std (as the official, for '
             'every image tower). Default: OpenCLIP\'s preprocessing of the model.')
    group.add_argument(
        '--ordinal-rank-window', type=int, nargs=2, default=None, metavar=('LO', 'HI'),
        help='Validation: the prototypes\' ordinality (every span) over ranks LO..HI only, both included (the '
             'official MORPH figures: 15 75). Default: all ranks.')


def check_ordinal_data_args(args):
    """Flag checks that need no data or model config (the rank window's upper bound is checked with the data)."""
    flags = _given_flags(args)
    if flags and args.csv_dataset_sample_type != 'ordinal':
        raise ValueError(f"{flags[0]} is an option of ordinal data: add --csv-dataset-sample-type ordinal.")
    if not flags:
        return
    if args.ordinal_few_shot < 0:
        raise ValueError(f"--ordinal-few-shot must be >= 0 (0: all images), got {args.ordinal_few_shot}.")
    if args.ordinal_label_shift < 0:
        raise ValueError(f"--ordinal-label-shift must be >= 0 (0: off), got {args.ordinal_label_shift}.")
    scale = args.ordinal_label_shift_scale
    if args.ordinal_label_shift > 0 and (scale is None or not 0.0 < scale < 1.0):
        raise ValueError(f"--ordinal-label-shift {args.ordinal_label_shift} needs --ordinal-label-shift-scale in "
                         f"(0, 1) (the official configs: 0.1, 0.2), got {scale}.")
    if scale is not None and args.ordinal_label_shift == 0:
        raise ValueError("--ordinal-label-shift-scale scales the ranks of --ordinal-label-shift K: add it.")
    if args.ordinal_long_tail is not None and args.ordinal_long_tail < 0:
        raise ValueError(f"--ordinal-long-tail must be a rank >= 0, got {args.ordinal_long_tail}.")
    window = args.ordinal_rank_window
    if window is not None and not 0 <= window[0] < window[1]:
        raise ValueError(f"--ordinal-rank-window LO HI needs 0 <= LO < HI, got {window[0]} {window[1]}.")
    for flag, attribute, data in (('--ordinal-long-tail', 'ordinal_long_tail', '--val-data'),
                                  ('--ordinal-rank-window', 'ordinal_rank_window', '--val-data')):
        if getattr(args, attribute) is not None and not getattr(args, 'val_data', None):
            raise ValueError(f"{flag} applies to validation: add {data}.")
    for flag in ('--ordinal-few-shot', '--ordinal-label-shift'):
        if flag in flags and not getattr(args, 'train_data', None):
            raise ValueError(f"{flag} selects training images: add --train-data.")
    from .shards import uses_shards
    subsets = [f for f in flags if f in ('--ordinal-few-shot', '--ordinal-label-shift', '--ordinal-long-tail')]
    if subsets and uses_shards(args):
        raise ValueError(f"{subsets[0]} selects images of a CSV / list file; streamed shards are not supported "
                         f"(use --dataset-type csv).")


def _given_flags(args) -> List[str]:
    given = []
    if getattr(args, 'ordinal_few_shot', 0):
        given.append('--ordinal-few-shot')
    if getattr(args, 'ordinal_label_shift', 0) or getattr(args, 'ordinal_label_shift_scale', None) is not None:
        given.append('--ordinal-label-shift')
    if getattr(args, 'ordinal_long_tail', None) is not None:
        given.append('--ordinal-long-tail')
    if getattr(args, 'ordinal_official_transforms', False):
        given.append('--ordinal-official-transforms')
    if getattr(args, 'ordinal_rank_window', None) is not None:
        given.append('--ordinal-rank-window')
    return given


def check_rank_window(window, num_ranks: int, flag='--ordinal-rank-window'):
    """(lo, hi) when the window fits ranks 0..num_ranks-1 with at least 2 ranks, else ValueError; None: all ranks."""
    if window is None:
        return None
    lo, hi = (int(v) for v in window)
    if not 0 <= lo < hi < num_ranks:
        raise ValueError(f"{flag} {lo} {hi} does not fit the model's ranks 0..{num_ranks - 1}: give "
                         f"0 <= LO < HI <= {num_ranks - 1}.")
    return lo, hi


# --- the subsets ----------------------------------------------------------------------------------------

def rank_counts(table: OrdinalTable) -> List[int]:
    """Images per rank 0..R-1, by evaluation label."""
    counts = [0] * table.num_ranks
    for label in table.eval_labels():
        counts[label] += 1
    return counts


def _groups(table: OrdinalTable) -> Dict[int, List[int]]:
    """Row indices per evaluation label, labels in order of first appearance (the official split_dataset_by_label)."""
    groups: Dict[int, List[int]] = {}
    for index, label in enumerate(table.eval_labels()):
        groups.setdefault(label, []).append(index)
    return groups


def _subset(table: OrdinalTable, picked) -> OrdinalTable:
    """``picked``: (row index, label) pairs; each image keeps that one label, as the official subsets."""
    return OrdinalTable([table.paths[i] for i, _ in picked], [[label] for _, label in picked], table.num_ranks,
                        table.source)


def few_shot_subset(table: OrdinalTable, num_shots: int, rng: random.Random) -> OrdinalTable:
    """``num_shots`` images per rank drawn without replacement; a rank with fewer keeps all of them."""
    picked = []
    for label, rows in _groups(table).items():
        chosen = rng.sample(rows, num_shots) if len(rows) >= num_shots else rows
        picked.extend((row, label) for row in chosen)
    return _subset(table, picked)


def label_shift_subset(table: OrdinalTable, top_k: int, scale: float, rng: random.Random) -> OrdinalTable:
    """The ``top_k`` ranks with the most images (a stable sort: ties in order of first appearance) keep
    max(int(n * scale), 1) of their n images, drawn without replacement; the other ranks keep all."""
    by_size = sorted(_groups(table).items(), key=lambda item: len(item[1]), reverse=True)
    picked = []
    for position, (label, rows) in enumerate(by_size):
        chosen = rng.sample(rows, max(int(len(rows) * scale), 1)) if position < top_k else rows
        picked.extend((row, label) for row in chosen)
    return _subset(table, picked)


def long_tail_subset(table: OrdinalTable, min_rank: int) -> OrdinalTable:
    """The images whose evaluation label is ``min_rank`` or more (their labels unchanged)."""
    keep = [i for i, label in enumerate(table.eval_labels()) if label >= min_rank]
    if not keep:
        raise RankDataError(f"{table.source}: --ordinal-long-tail {min_rank} leaves no image (its labels lie in "
                            f"{min(table.eval_labels())}..{max(table.eval_labels())}); lower MIN_RANK.")
    return OrdinalTable([table.paths[i] for i in keep], [table.labels[i] for i in keep], table.num_ranks,
                        table.source)


def _log_counts(what: str, before: OrdinalTable, after: OrdinalTable):
    _logger.info(f"{what}: {len(before)} -> {len(after)} images of {before.source}.")
    _logger.info(f"{what}: images per rank 0..{before.num_ranks - 1} before: {rank_counts(before)}")
    _logger.info(f"{what}: images per rank 0..{before.num_ranks - 1} after: {rank_counts(after)}")


def training_subset(table: OrdinalTable, args, log: bool = True) -> OrdinalTable:
    """The training table after ``--ordinal-few-shot`` and ``--ordinal-label-shift`` (in that order, one
    ``random.Random(--seed)``, as the official data module); unchanged without them."""
    few_shot = getattr(args, 'ordinal_few_shot', 0)
    shift = getattr(args, 'ordinal_label_shift', 0)
    if not few_shot and not shift:
        return table
    if table.labels is None:
        raise RankDataError(f"{table.source} has no labels; --ordinal-few-shot / --ordinal-label-shift need them.")
    rng = random.Random(args.seed)
    if few_shot:
        subset = few_shot_subset(table, few_shot, rng)
        if log:
            _log_counts(f"Ordinal few-shot (--ordinal-few-shot {few_shot}, --seed {args.seed})", table, subset)
        table = subset
    if shift:
        scale = args.ordinal_label_shift_scale
        subset = label_shift_subset(table, shift, scale, rng)
        if log:
            _log_counts(f"Ordinal label shift (--ordinal-label-shift {shift}, --ordinal-label-shift-scale {scale}, "
                        f"--seed {args.seed})", table, subset)
        table = subset
    return table


def validation_subset(table: OrdinalTable, args, log: bool = True) -> OrdinalTable:
    """The validation table after ``--ordinal-long-tail``; unchanged without it."""
    min_rank = getattr(args, 'ordinal_long_tail', None)
    if min_rank is None:
        return table
    subset = long_tail_subset(table, min_rank)
    if log:
        _log_counts(f"Ordinal long tail (--ordinal-long-tail {min_rank})", table, subset)
    return subset


def subset_description(args, train: bool) -> Optional[str]:
    """'after --ordinal-few-shot 4' etc. for messages about a subset's size; None without one."""
    flags = []
    if train and getattr(args, 'ordinal_few_shot', 0):
        flags.append(f"--ordinal-few-shot {args.ordinal_few_shot}")
    if train and getattr(args, 'ordinal_label_shift', 0):
        flags.append(f"--ordinal-label-shift {args.ordinal_label_shift}")
    if not train and getattr(args, 'ordinal_long_tail', None) is not None:
        flags.append(f"--ordinal-long-tail {args.ordinal_long_tail}")
    return f"after {' '.join(flags)}" if flags else None


# --- the official preprocessing ---------------------------------------------------------------------------

def _input_size(preprocess_val):
    """(height, width) the model's own evaluation preprocessing crops to."""
    from torchvision import transforms as T
    size = None
    for step in preprocess_val.transforms:
        if isinstance(step, (T.CenterCrop, T.Resize)):
            size = step.size
    if size is None:
        raise ValueError("the model's preprocessing has no Resize / CenterCrop to read its input size from.")
    if isinstance(size, int):
        return size, size
    size = tuple(size)
    return (size[0], size[0]) if len(size) == 1 else size


def official_transforms(preprocess_val):
    """(train, val) as the official ``get_transforms`` with its default config (random_resized_crop, random_hflip,
    normalize; input_resize 256, input_size 224, ImageNet mean/std), scaled to the model's input size: training
    Resize((s*8/7, s*8/7)) + RandomCrop(s) + RandomHorizontalFlip; validation Resize + CenterCrop(s)."""
    from torchvision import transforms as T
    height, width = _input_size(preprocess_val)
    resize = T.Resize((round(height * OFFICIAL_RESIZE_RATIO), round(width * OFFICIAL_RESIZE_RATIO)))
    tail = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train = T.Compose([resize, T.RandomCrop((height, width)), T.RandomHorizontalFlip(), *tail])
    val = T.Compose([resize, T.CenterCrop((height, width)), *tail])
    return train, val


def official_cli_transform(args, model, transform):
    """The rank CLI's preprocessing (``SampleType.cli_transform``): with ``--ordinal-official-transforms``, the
    official evaluation preprocessing a model trained with that flag was validated with; else the model's own."""
    if not getattr(args, 'ordinal_official_transforms', False):
        return transform
    return official_transforms(transform)[1]
