"""The 'ordinal' sample type streamed from webdataset shards: each sample's json holds an integer ``value`` (and
optionally ``labels``, a random one per training step, as the list files); batches as the CSV path's."""
import functools
import math
import logging
import random

from ..files.images import open_rgb
from .ordinal_dataset import collate_ordinal_batch
from .shards import (SkipCounter, check_shards, image_bytes, sample_key, sample_meta, scan_categories, shard_source,
                     skip_sample, train_loader, train_num_samples, val_loader)

_logger = logging.getLogger(__name__)


def decode_ordinal_samples(src, transform, num_ranks, train, counter=None, load_truncated=False):
    """Raw tar samples -> (image, label); a bad label or image is skipped and counted (a truncated image decodes
    with ``load_truncated``, ``--load-truncated-images``)."""
    counter = counter or SkipCounter()
    for sample in src:
        try:
            meta = sample_meta(sample)
            labels = meta.get('labels') or [meta['value']]
            labels = [int(float(v)) if float(v).is_integer() else math.nan for v in labels]
            if not all(isinstance(v, int) and 0 <= v < num_ranks for v in labels):
                raise ValueError(f"label(s) {labels} are not integers in [0, {num_ranks})")
            label = random.choice(labels) if train else labels[len(labels) // 2]
            tensor = transform(open_rgb(image_bytes(sample), load_truncated=load_truncated))
        except Exception as err:
            skip_sample(counter, sample_key(sample), err)
            continue
        yield tensor, label


def get_ordinal_shard_data(args, train_transform, val_transform, num_ranks, epoch):
    import webdataset as wds
    from .loaders import DataInfo, RankDataInfo, SharedEpoch
    data = {}
    if args.train_data:
        check_shards(args.train_data, '--train-data')
        num_samples = train_num_samples(args)
        shared_epoch = SharedEpoch(epoch)
        pipeline = [*shard_source(args.train_data, args, shared_epoch, True),
                    functools.partial(decode_ordinal_samples, transform=train_transform, num_ranks=num_ranks,
                                      train=True, load_truncated=getattr(args, 'load_truncated_images', False)),
                    wds.batched(args.batch_size, partial=False, collation_fn=collate_ordinal_batch)]
        loader = train_loader(pipeline, args, num_samples)
        data['train'] = DataInfo(loader, shared_epoch=shared_epoch)
        _logger.info(f"Ordinal training data from shards: {num_samples} samples, {num_ranks} ranks, "
                     f"{loader.num_batches} batches of {args.batch_size} per process per epoch.")
    if args.val_data:
        check_shards(args.val_data, '--val-data')
        info = scan_categories(args.val_data, 'ordinal')
        info.num_ranks = num_ranks
        pipeline = [*shard_source(args.val_data, args, None, False),
                    functools.partial(decode_ordinal_samples, transform=val_transform, num_ranks=num_ranks,
                                      train=False, counter=SkipCounter(where='validation'),
                                      load_truncated=getattr(args, 'load_truncated_images', False)),
                    wds.batched(args.batch_size, partial=True, collation_fn=collate_ordinal_batch)]
        data['val'] = RankDataInfo(val_loader(pipeline, args, info.num_samples), table=info, sample_type='ordinal')
    return data
