"""Rank sampling: batch structure, determinism, ranks, weights, small categories, bad input."""
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import open_clip
from open_clip_train.data import SharedEpoch
from open_clip_rank.data import (RankBatchSampler, RankDataError, RankDataset, RankTable, collate_rank_batch,
                                 load_rank_table)
from open_clip_rank.data.rank import get_rank_data
from open_clip_rank.data.batches import RankTexts
from helpers import write_rank_csv

pytestmark = pytest.mark.unit


def _table(sizes, weights=None):
    ids = np.concatenate([np.full(n, c) for c, n in enumerate(sizes)])
    names = [f'cat{c}' for c in range(len(sizes))]
    rows = len(ids)
    return RankTable([f'/x/{i}.png' for i in range(rows)], [f'Rank the numbers of {names[c]}.' for c in ids],
                     ids, names, np.arange(rows, dtype=float) % 7, weights, 'test.csv')


def test_batches_are_one_category_with_other_category_negatives():
    table = _table([40, 30, 25])
    sampler = RankBatchSampler(table, batch_size=10, negative_ratio=0.2, seed=1)
    assert len(sampler) == 95 // 10
    for batch in sampler.plan(0):
        assert len(batch) == 10
        positives = [r for r, c in batch if c < 0]
        negatives = [(r, c) for r, c in batch if c >= 0]
        assert len(positives) == 8 and len(set(positives)) == 8  # without replacement
        category = table.category_ids[positives[0]]
        assert all(table.category_ids[r] == category for r in positives)
        assert all(c == category and table.category_ids[r] != category for r, c in negatives)


def test_plan_is_deterministic_and_differs_across_epochs_and_ranks():
    table = _table([50, 50, 50])
    make = lambda rank, world: RankBatchSampler(table, 6, 0.25, seed=7, rank=rank, world_size=world)
    assert make(0, 1).plan(3) == make(0, 1).plan(3)
    assert make(0, 1).plan(3) != make(0, 1).plan(4)
    world = make(0, 1).plan(3)
    r0, r1 = make(0, 2).plan(3), make(1, 2).plan(3)
    assert len(r0) == len(r1) == 150 // 12
    assert r0 != r1
    assert r0 == world[0:2 * len(r0):2] and r1 == world[1:2 * len(r1):2]


def test_epoch_comes_from_shared_epoch():
    table = _table([30, 30])
    shared = SharedEpoch(0)
    sampler = RankBatchSampler(table, 6, 0.0, seed=0, shared_epoch=shared)
    shared.set_value(5)
    assert list(iter(sampler)) == sampler.plan(5)


def test_small_category_gives_all_its_rows_plus_negatives():
    table = _table([3, 40])
    sampler = RankBatchSampler(table, 8, 0.25, seed=0)
    small = [b for epoch in range(5) for b in sampler.plan(epoch)
             if table.category_ids[[r for r, c in b if c < 0][0]] == 0]
    assert small
    for batch in small:
        assert len(batch) == 8
        assert sorted(r for r, c in batch if c < 0) == [0, 1, 2]
        assert sum(c >= 0 for _, c in batch) == 5


def test_weights_steer_positive_sampling():
    weights = np.array([1.0] * 10 + [0.0] * 10 + [1.0] * 20)
    table = _table([20, 20], weights=weights)
    sampler = RankBatchSampler(table, 5, 0.0, seed=0)
    drawn = [r for epoch in range(20) for b in sampler.plan(epoch) for r, _ in b]
    assert not set(drawn) & set(range(10, 20)), 'zero-weight rows must never be drawn when others remain'


def test_single_category_with_negatives_is_a_clear_error():
    with pytest.raises(RankDataError, match='at least two categories.*--negative-ratio 0'):
        RankBatchSampler(_table([30]), 6, 0.2)


def test_too_few_rows_for_one_batch_is_a_clear_error():
    with pytest.raises(RankDataError, match='fewer than one batch per process'):
        RankBatchSampler(_table([3, 3]), 8, 0.0, world_size=1)


# --- real files ----------------------------------------------------------------------------------

def _args(train, val=None, **kw):
    base = dict(model='tiny-vit-adapter', loss_opt=None, train_data=train, val_data=val, csv_img_key='filepath', csv_caption_key='title',
                csv_value_key='value', csv_category_key='cname', csv_weight_key='sample_weights_by_class',
                csv_separator='\t', negative_ratio=0.25, batch_size=8, seed=3, rank=0, world_size=1, workers=0)
    base.update(kw)
    return SimpleNamespace(**base)


def _preprocess():
    _, _, val = open_clip.create_model_and_transforms('tiny-vit-adapter', device='meta')
    return None, val


def test_samples_negatives_and_workers_give_identical_batches(tmp_path):
    path = write_rank_csv(str(tmp_path), per_count=2)
    tokenizer = open_clip.get_tokenizer('tiny-vit-adapter')
    batches = {}
    for workers in (0, 2):
        data = get_rank_data(_args(path, workers=workers), _preprocess(), epoch=1, tokenizer=tokenizer)
        loader = data['train'].dataloader
        assert loader.num_batches == 24 // 8 and loader.num_samples == 24
        data['train'].set_epoch(1)
        batches[workers] = [(images, texts) for images, texts in loader]
    for (im0, tx0), (im2, tx2) in zip(batches[0], batches[2]):
        assert isinstance(tx0, RankTexts)
        assert torch.equal(tx0.tokens, tx2.tokens) and torch.equal(tx0.targets, tx2.targets)
        assert im0.shape == (8, 3, 32, 32)
    # negatives: the caption names the batch's category and the target is 0
    table = load_rank_table(path)
    dataset = RankDataset(table, _preprocess()[1], tokenizer)
    circle, square = table.category_names.index('circle'), table.category_names.index('square')
    square_row = int(table.rows_of(square)[-1])
    image, tokens, target, category = dataset[(square_row, circle)]
    assert target == 0.0 and category == circle
    assert torch.equal(tokens, tokenizer(['Rank the numbers of circle.'])[0])


def test_unreadable_image_is_skipped_replaced_and_logged(tmp_path, caplog):
    path = write_rank_csv(str(tmp_path), per_count=2)
    table = load_rank_table(path)
    with open(table.paths[3], 'wb') as f:
        f.write(b'not an image at all')
    dataset = RankDataset(table, _preprocess()[1], open_clip.get_tokenizer('tiny-vit-adapter'))
    with caplog.at_level(logging.WARNING):
        image, _, target, _ = dataset[(3, -1)]
    assert image.shape == (3, 32, 32)
    assert target == table.values[4]  # the next row of the same category took its place
    assert 'Skipping unreadable image' in caplog.text and '1 skipped so far' in caplog.text
    val = RankDataset(table, _preprocess()[1], open_clip.get_tokenizer('tiny-vit-adapter'), replace_unreadable=False)
    assert val[3] is None
    images, texts = collate_rank_batch([val[2], val[3], val[4]])
    assert images.shape[0] == 2 and texts.targets.shape == (2,)


# --- bad input: one clear line each -----------------------------------------------------------------

def _write(tmp_path, text, name='bad.csv'):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.fixture
def image_file(tmp_path):
    from PIL import Image
    path = tmp_path / 'ok.png'
    Image.new('RGB', (8, 8)).save(path)
    return str(path)


def test_bad_csvs_give_one_clear_line(tmp_path, image_file):
    cases = {
        'missing column': (f'filepath\ttitle\tcname\n{image_file}\tRank the numbers of a.\ta\n',
                           r"has no column 'value' .*--csv-value-key"),
        'non-numeric': (f'filepath\ttitle\tcname\tvalue\n{image_file}\tRank a.\ta\tlots\n',
                        r"column 'value' must be numeric and finite; 1 bad value\(s\): row 2: 'lots'"),
        'nan': (f'filepath\ttitle\tcname\tvalue\n{image_file}\tRank a.\ta\tnan\n', r"must be numeric and finite"),
        'missing files': ('filepath\ttitle\tcname\tvalue\n' + ''.join(f'/no/such/{i}.png\tRank a.\ta\t1\n'
                                                                      for i in range(5)),
                          r"5 image file\(s\) listed in .* do not exist: /no/such/0.png, /no/such/1.png, "
                          r"/no/such/2.png \(\+2 more\)"),
        'no category column': (f'filepath\ttitle\tvalue\n{image_file}\tRank a.\t1\n',
                               r"has no column 'cname'.*--csv-category-key"),
        'empty': ('', r"is empty"),
        'header only': ('filepath\ttitle\tcname\tvalue\n', r"has a header but no data rows"),
        'caption without category': (f'filepath\ttitle\tcname\tvalue\n{image_file}\tRank the numbers.\tcat\t1\n',
                                     r"do not contain their 'cname'.*--negative-ratio 0"),
    }
    for case, (text, message) in cases.items():
        path = _write(tmp_path, text, name=case.replace(' ', '_') + '.csv')
        with pytest.raises(RankDataError, match=message) as info:
            load_rank_table(path, check_category_in_caption=True)
        assert '\n' not in str(info.value), case


def test_wrong_separator_hint(tmp_path, image_file):
    path = _write(tmp_path, f'filepath,title,cname,value\n{image_file},Rank a.,a,1\n')
    with pytest.raises(RankDataError, match='--csv-separator'):
        load_rank_table(path)


@pytest.mark.parametrize('batch_size, ratio, positives', [(10, 0.25, 7), (10, 0.2, 8), (8, 0.25, 6), (5, 0.0, 5),
                                                          (7, 0.5, 3), (16, 0.3, 11)])
def test_positives_per_batch_are_the_official_count(batch_size, ratio, positives):
    """min(int(B * (1 - r)), n) positives, as the original sampler (10, 0.25 gives 7, not round's 8)."""
    table = _table([60, 60])
    sampler = RankBatchSampler(table, batch_size, ratio, seed=0)
    for batch in sampler.plan(0):
        assert sum(c < 0 for r, c in batch) == positives and len(batch) == batch_size


def test_relevance_score_batches_reword_captions_and_targets():
    table = _table([30, 30])
    sampler = RankBatchSampler(table, 6, 0.25, seed=2, relevance_max=13)
    dataset = RankDataset(table, lambda image: torch.zeros(1), lambda captions: captions)
    dataset._load_image = lambda row: torch.zeros(1)
    references = set()
    for batch in sampler.plan(0):
        keys = {key[2] for key in batch}
        assert len(keys) == 1 and 0 <= next(iter(keys)) < 13  # one reference value per batch
        reference = next(iter(keys))
        references.add(reference)
        for key in batch:
            _, caption, target, _ = dataset[key]
            row, category = key[0], key[1]
            value = table.values[row] if category < 0 else 0.0
            assert target == abs(value - reference)
            assert caption.endswith(f" by the relevance count to {reference}.") and caption.count('.') == 1
    assert len(references) > 1
    two_ranks = [RankBatchSampler(table, 6, 0.25, seed=2, relevance_max=13, rank=r, world_size=2).plan(0)
                 for r in (0, 1)]
    everything = RankBatchSampler(table, 6, 0.25, seed=2, relevance_max=13).plan(0)
    assert two_ranks[0] == everything[0::2][:len(two_ranks[0])]  # the same references on every process
