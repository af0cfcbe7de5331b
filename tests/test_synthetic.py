"""The synthetic counting dataset: CSV format, balance, weights, images, determinism and true counts."""
import csv
import hashlib
import os
from collections import Counter, defaultdict, deque

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage  # the `test` extra

from open_clip_rank.data import load_rank_table
from open_clip_rank.synthetic.counting import (
    COLUMNS, SHAPES, draw_counting_image, image_rng, make_counting_dataset)
from helpers import make_unreadable_image

pytestmark = pytest.mark.unit

SMALL = dict(max_count=4, train_per_count=3, val_per_count=2, image_size=48)


def read_rows(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f, delimiter='\t'))


def flood_fill_count(mask):
    """Connected components of a boolean mask, 8-connected (tiny BFS, no scipy needed)."""
    seen = np.zeros_like(mask, dtype=bool)
    height, width = mask.shape
    components = 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        components += 1
        seen[y0, x0] = True
        queue = deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
    return components


def count_components(mask):
    return int(ndimage.label(mask, structure=np.ones((3, 3)))[1])


def color_mask(image, color):
    return (np.asarray(image) == np.asarray(color, dtype=np.uint8)).all(axis=-1)


def digest(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    return make_counting_dataset(tmp_path_factory.mktemp('counting'), return_metadata=True)


@pytest.fixture(scope='module')
def small(tmp_path_factory):
    return make_counting_dataset(tmp_path_factory.mktemp('small'), **SMALL)


def test_result_keys_and_sizes(dataset):
    assert set(dataset) == {'train_csv', 'val_csv', 'root', 'kinds', 'num_train', 'num_val', 'metadata'}
    assert tuple(dataset['kinds']) == SHAPES
    assert dataset['num_train'] == 3 * 10 * 24 and dataset['num_val'] == 3 * 10 * 8
    assert len(dataset['metadata']) == dataset['num_train'] + dataset['num_val']
    assert os.path.isabs(dataset['root'])


def test_csv_header_and_separator(dataset):
    for key in ('train_csv', 'val_csv'):
        with open(dataset[key]) as f:
            header = f.readline().rstrip('\n')
            first = f.readline().rstrip('\n')
        assert header == '\t'.join(COLUMNS) == 'filepath\ttitle\tcname\tvalue\tsample_weights_by_class'
        assert len(first.split('\t')) == 5


def test_rows_per_kind_and_count(dataset):
    for key, per_count, n in (('train_csv', 24, 'num_train'), ('val_csv', 8, 'num_val')):
        rows = read_rows(dataset[key])
        assert len(rows) == dataset[n]
        counts = Counter((r['cname'], int(r['value'])) for r in rows)
        assert counts == {(kind, value): per_count for kind in SHAPES for value in range(10)}
        for r in rows:
            assert r['title'] == f"Rank the numbers of {r['cname']}."
            assert r['cname'] in r['title']


def test_weights_balance_values_and_sum_to_one_per_cname(small, tmp_path):
    for key in ('train_csv', 'val_csv'):
        totals = defaultdict(float)
        for r in read_rows(small[key]):
            totals[r['cname']] += float(r['sample_weights_by_class'])
        assert set(totals) == set(SHAPES)
        assert all(t == pytest.approx(1.0, abs=1e-9) for t in totals.values())
    rows = read_rows(small['train_csv'])
    expected = 1.0 / (SMALL['train_per_count'] * (SMALL['max_count'] + 1))
    assert all(float(r['sample_weights_by_class']) == pytest.approx(expected) for r in rows)


def test_filepaths_exist_and_open_as_rgb(small):
    for key in ('train_csv', 'val_csv'):
        for r in read_rows(small[key]):
            assert os.path.isabs(r['filepath']) and os.path.isfile(r['filepath'])
            with Image.open(r['filepath']) as image:
                assert image.mode == 'RGB'
                assert image.size == (SMALL['image_size'], SMALL['image_size'])


def test_project_loader_accepts_the_csv(small):
    table = load_rank_table(small['train_csv'], check_category_in_caption=True)
    assert len(table) == small['num_train']
    assert table.category_names == sorted(SHAPES)
    assert table.weights is not None and set(table.values.tolist()) == set(range(SMALL['max_count'] + 1))


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    kwargs = dict(max_count=2, train_per_count=1, val_per_count=1, image_size=32)
    a = make_counting_dataset(tmp_path / 'a', seed=3, **kwargs)
    b = make_counting_dataset(tmp_path / 'b', seed=3, **kwargs)
    c = make_counting_dataset(tmp_path / 'c', seed=4, **kwargs)
    names = sorted(os.listdir(os.path.join(a['root'], 'images')))
    assert len(names) == a['num_train'] + a['num_val']
    for name in names[:6]:
        assert digest(os.path.join(a['root'], 'images', name)) == digest(os.path.join(b['root'], 'images', name))
    differ = [digest(os.path.join(a['root'], 'images', n)) != digest(os.path.join(c['root'], 'images', n))
              for n in names]
    assert all(differ)


def test_drawn_counts_match_values(dataset):
    by_value = {}
    for info in dataset['metadata']:
        by_value.setdefault((info['kind'], info['count']), info)
    for (kind, count), info in sorted(by_value.items()):
        with Image.open(info['filepath']) as image:
            assert count_components(color_mask(image, info['shape_color'])) == count, info['filepath']
            distractors = count_components(color_mask(image, info['distractor_color']))
        assert distractors == len(info['distractor_kinds']) <= 3
        assert kind not in info['distractor_kinds']


def test_distractors_appear_and_are_other_kinds(dataset):
    with_distractors = [m for m in dataset['metadata'] if m['distractor_kinds']]
    assert len(with_distractors) > len(dataset['metadata']) // 2
    assert all(k in SHAPES and k != m['kind'] for m in with_distractors for k in m['distractor_kinds'])


def test_draw_counting_image_crowded_falls_back_and_stays_exact():
    """Many large shapes in a small image: rejection sampling gives up, the grid still places all of them."""
    seen_grid = False
    for index in range(40):
        rng = image_rng(0, 'square', 'train', 9, index)
        image, info = draw_counting_image(rng, 'square', 9, 32, ('circle', 'triangle'), max_shapes=12)
        seen_grid |= info['used_grid']
        assert image.size == (32, 32) and image.mode == 'RGB'
        assert flood_fill_count(color_mask(image, info['shape_color'])) == 9
        assert flood_fill_count(color_mask(image, info['distractor_color'])) == len(info['distractor_kinds'])
    assert seen_grid


def test_flood_fill_agrees_with_scipy(dataset):
    for info in dataset['metadata'][::97]:
        with Image.open(info['filepath']) as image:
            mask = color_mask(image, info['shape_color'])
        assert flood_fill_count(mask) == ndimage.label(mask, structure=np.ones((3, 3)))[1]


def test_bad_arguments_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match='kinds'):
        make_counting_dataset(tmp_path, kinds=('hexagon',))
    with pytest.raises(ValueError, match='image_size'):
        make_counting_dataset(tmp_path, image_size=8)


def test_unreadable_image(tmp_path):
    path = make_unreadable_image(tmp_path / 'sub' / 'broken.png')
    assert path.endswith('.png') and os.path.getsize(path) > 0
    with pytest.raises(Exception):
        with Image.open(path) as image:
            image.load()
