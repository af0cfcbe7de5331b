"""The toy family's module (registered in ``__init__.py``): a linear head on the pooled image feature.

* family ``toy``: any config with ``toy_cfg`` builds ``ToyCLIP``, a linear head on the pooled image feature
  (no prompt: ``needs_prompt`` False);
* loss ``toy-mse``: the weighted mean squared error of the scores, with its own flag ``--toy-loss-weight``;
* sample type ``toy``: a CSV ``filepath<TAB>value`` (its own flag ``--toy-value-scale``); shards hold
  ``{'value'}``; validation and the rank CLI report the SRCC of the scores.
"""
import csv
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from open_clip.model import CLIP
from open_clip_rank.models.base import RankModel, RankOutput

# --- the model ------------------------------------------------------------------------------------------

class ToyTargets:
    """The ``texts`` of a toy batch: the target values, moved by OpenCLIP's ``.to()``."""

    def __init__(self, values):
        self.values = values

    def to(self, *args, **kwargs):
        return ToyTargets(self.values.to(*args, **kwargs))


class ToyCLIP(RankModel, CLIP):
    family_name = 'toy'
    fresh_state_prefixes = ('toy_head.',)
    needs_prompt = False

    def __init__(self, embed_dim, vision_cfg, text_cfg, toy_cfg=None, **kwargs):
        super().__init__(embed_dim, vision_cfg, text_cfg, **kwargs)
        self.toy_head = nn.Linear(embed_dim, 1, bias=(toy_cfg or {}).get('head_bias', True))

    def rank_forward(self, image, text=None):
        scores = self.score_tokens(self.encode_image_tokens(image), None)
        out = RankOutput(rank_scores=scores, logit_scale=self.logit_scale.exp())
        if isinstance(text, ToyTargets):
            out['targets'] = text.values
        return out

    def forward(self, image=None, text=None):
        if image is None:
            return super().forward(None, text)
        return self.rank_forward(image, text)

    def encode_image_tokens(self, image):
        return self.encode_image(image, normalize=True)

    def encode_prompts(self, text=None):
        return None

    def score_tokens(self, image_tokens, prompts):
        return self.toy_head(image_tokens).squeeze(-1)


# --- the loss -------------------------------------------------------------------------------------------

class ToyMSELoss(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def forward(self, rank_scores, targets, output_dict=False, **_):
        loss = self.weight * F.mse_loss(rank_scores.float(), targets.float())
        return {'toy_mse_loss': loss} if output_dict else loss


def build_toy_loss(args):
    return ToyMSELoss(args.toy_loss_weight)


def add_toy_loss_args(parser):
    parser.add_argument_group('toy loss').add_argument('--toy-loss-weight', type=float, default=1.0)


def check_toy_loss_args(args):
    if args.toy_loss_weight <= 0:
        raise ValueError(f"--toy-loss-weight must be > 0, got {args.toy_loss_weight}.")


# --- the sample type ------------------------------------------------------------------------------------

def add_toy_data_args(parser):
    parser.add_argument_group('toy data').add_argument('--toy-value-scale', type=float, default=1.0,
                                                       help='targets are value x scale')


def check_toy_data_args(args):
    if args.csv_dataset_sample_type == 'toy' and args.toy_value_scale == 0:
        raise ValueError('--toy-value-scale must not be 0.')


def read_table(path, img_key='filepath', value_key='value', sep='\t'):
    from open_clip_rank.data import RankDataError
    if not os.path.isfile(path):
        raise RankDataError(f"toy data {path} does not exist.")
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f, delimiter=sep))
    if not rows or img_key not in rows[0] or value_key not in rows[0]:
        raise RankDataError(f"{path} needs the columns '{img_key}' and '{value_key}'.")
    return [r[img_key] for r in rows], [float(r[value_key]) for r in rows]


def check_toy_data(args):
    for path in (args.train_data, args.val_data):
        if path:
            read_table(path, args.csv_img_key, args.csv_value_key, args.csv_separator)


class ToyDataset(Dataset):
    def __init__(self, paths, values, transform):
        self.paths, self.values, self.transform = paths, values, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert('RGB')), self.values[i]


def collate(samples):
    images, values = zip(*samples)
    return torch.stack(images), ToyTargets(torch.tensor(values, dtype=torch.float32))


def get_toy_data(args, preprocess_fns, epoch=0, tokenizer=None):
    from open_clip_rank.data.loaders import DataInfo, RankDataInfo, SharedEpoch
    data = {}
    for split, path, transform in (('train', args.train_data, preprocess_fns[0]),
                                   ('val', args.val_data, preprocess_fns[1])):
        if not path:
            continue
        paths, values = read_table(path, args.csv_img_key, args.csv_value_key, args.csv_separator)
        dataset = ToyDataset(paths, [v * args.toy_value_scale for v in values], transform)
        train = split == 'train'
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(args.seed)) if train else None
        loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=train,
                            num_workers=args.workers, collate_fn=collate)
        loader.num_batches, loader.num_samples = len(loader), len(dataset)
        data[split] = DataInfo(loader, shared_epoch=SharedEpoch(epoch)) if train else \
            RankDataInfo(loader, table=dataset, sample_type='toy')
    return data


def _srcc(scores, targets):
    from open_clip_rank.evaluation.metrics import srcc
    return srcc(scores, targets)


@torch.inference_mode()
def toy_validation(model, info, args, epoch=None):
    from open_clip_rank.evaluation.validation import inference_setup
    from open_clip_rank.models.base import unwrap
    device, autocast, input_dtype = inference_setup(model, args)
    scores, targets = [], []
    for images, values in info.dataloader:
        with autocast():
            scores.append(unwrap(model).rank_scores(images.to(device=device, dtype=input_dtype), None).float().cpu())
        targets.append(values.values)
    return {'toy_srcc': _srcc(torch.cat(scores).numpy(), torch.cat(targets).numpy())}


def toy_shard_records(args):
    paths, values = read_table(args.csv, args.csv_img_key, args.csv_value_key, args.csv_separator)
    for path, value in zip(paths, values):
        yield path, {'value': value}


def read_toy_rows(args, model):
    paths, values = read_table(args.csv, args.csv_img_key, args.csv_value_key, args.csv_separator)
    return [{'image': p, 'prompt': '', 'category': '', 'target': v} for p, v in zip(paths, values)]


def toy_report(args, model, rows):
    scored = [r for r in rows if r.get('score') is not None and r['target'] is not None]
    if not scored:
        return {}
    metrics = {'toy_srcc': _srcc([r['score'] for r in scored], [r['target'] for r in scored])}
    print(json.dumps(metrics))
    return {'metrics': metrics}


# --- data for the test ----------------------------------------------------------------------------------

def make_brightness_dataset(root, num_train=96, num_val=48, size=32, seed=0):
    """Grey images whose brightness is the target (value in [0, 1]) plus noise: train.csv / val.csv."""
    import numpy as np
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / 'images').mkdir(parents=True, exist_ok=True)
    out = {}
    for split, count in (('train', num_train), ('val', num_val)):
        lines = ['filepath\tvalue']
        for i in range(count):
            value = float(rng.uniform(0, 1))
            pixels = np.clip(40 + 170 * value + rng.normal(0, 12, (size, size, 3)), 0, 255).astype('uint8')
            path = root / 'images' / f'{split}_{i:03d}.png'
            Image.fromarray(pixels).save(path)
            lines.append(f'{path}\t{value:.6f}')
        out[split] = root / f'{split}.csv'
        out[split].write_text('\n'.join(lines) + '\n')
    return out
