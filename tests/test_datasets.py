"""``python -m open_clip_rank.prepare_datasets``: tiny fake copies of each dataset in its public file layout."""
import json
import os
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from open_clip_rank import prepare_datasets as ds
from open_clip_rank.data.table import load_rank_table

pytestmark = pytest.mark.unit


def _image(path: Path, shade=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', (8, 8), (shade % 256, 60, 90)).save(path)


def _read(out: Path, split: str) -> pd.DataFrame:
    return pd.read_csv(out / f'{split}.csv', sep='\t')


def _check_csvs(out: Path, summary):
    """Every written CSV: the training format, absolute existing paths, weights summing to 1 per category."""
    for split, entry in summary['splits'].items():
        path = out / f'{split}.csv'
        if not entry['rows']:
            assert not path.exists()
            continue
        df = _read(out, split)
        assert list(df.columns) == list(ds.COLUMNS)
        assert len(df) == entry['rows']
        assert all(os.path.isabs(p) for p in df.filepath)
        table = load_rank_table(str(path), check_category_in_caption=True)
        assert len(table) == entry['rows']
        for _, group in df.groupby('cname'):
            assert group.sample_weights_by_class.sum() == pytest.approx(1.0)
    assert not [p for p in os.listdir(out) if p.endswith('.tmp')]


def _run_cli(capsys, *argv):
    rc = ds.main(list(argv) + ['--no-progress'])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _split_file(tmp_path, train, test, **extra):
    path = tmp_path / 'split.json'
    path.write_text(json.dumps({'train_id': list(train), 'test_id': list(test), **extra}))
    return path


# ------------------------------------------------------------------------------------------- KonIQ


def make_koniq(root: Path, n=10):
    names = [f'{1000 + i}.jpg' for i in range(n)]
    lines = ['"image_name","c1","c2","c3","c4","c5","c_total","MOS","SD","MOS_zscore"']
    for i, name in enumerate(names):
        mos = 1.5 + 0.3 * i
        lines.append(f'"{name}",1,2,3,4,5,15,{mos:.4f},0.5,{20 + 5 * i}')
        _image(root / '1024x768' / name, i * 20)
    (root / 'koniq10k_scores_and_distributions.csv').write_text('\n'.join(lines) + '\n')
    return names


def test_koniq_default_split(tmp_path, capsys):
    root, out = tmp_path / 'koniq10k', tmp_path / 'out'
    make_koniq(root)
    rc, stdout, _ = _run_cli(capsys, 'koniq', '--root', str(root), '--out', str(out))
    assert rc == 0
    assert 'train' in stdout and 'quality' in stdout and '1.5..4.2' in stdout
    frames = {s: _read(out, s) for s in ds.SPLIT_NAMES}
    assert [len(frames[s]) for s in ds.SPLIT_NAMES] == [7, 1, 2]
    alldf = pd.concat(frames.values())
    assert sorted(Path(p).name for p in alldf.filepath) == [f'{1000 + i}.jpg' for i in range(10)]
    assert set(alldf.title) == {'Rank the image quality.'} and set(alldf.cname) == {'quality'}
    mos = {Path(p).stem: v for p, v in zip(alldf.filepath, alldf.value)}
    assert mos['1003'] == pytest.approx(2.4)
    # deterministic: same seed, same split; another seed, another split
    ds.prepare('koniq', root, tmp_path / 'again', progress=False)
    assert _read(tmp_path / 'again', 'test').filepath.tolist() == frames['test'].filepath.tolist()
    ds.prepare('koniq', root, tmp_path / 'seed1', seed=1, progress=False)
    assert _read(tmp_path / 'seed1', 'test').filepath.tolist() != frames['test'].filepath.tolist()


def test_koniq_split_json(tmp_path):
    root, out = tmp_path / 'koniq10k', tmp_path / 'out'
    make_koniq(root)
    split = _split_file(tmp_path, [str(1000 + i) for i in range(7)], ['1007', '1008', '99999'])
    summary = ds.prepare('koniq', root, out, split_json=split, val_fraction=0.3, progress=False)
    _check_csvs(out, summary)
    stems = {s: sorted(Path(p).stem for p in _read(out, s).filepath) for s in ds.SPLIT_NAMES}
    assert stems['test'] == ['1007', '1008']
    assert len(stems['val']) == 2 and len(stems['train']) == 5
    assert set(stems['train']) | set(stems['val']) == {str(1000 + i) for i in range(7)}
    assert summary['dropped'] == {'not in the split file': 1}  # 1009 is in neither list
    assert summary['split_ids_not_found'] == 1  # 99999


# ------------------------------------------------------------------------------------------- AVA


def make_ava(root: Path):
    rows = {953417: [0, 0, 0, 0, 10, 0, 0, 0, 0, 0],  # mean 5
            953777: [0, 0, 0, 0, 0, 0, 0, 0, 5, 5],   # mean 9.5
            954222: [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],   # mean 5.5
            770556: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],   # no votes: left out
            771289: [0, 0, 2, 0, 0, 0, 0, 0, 0, 1]}   # (3*2 + 10) / 3
    lines = []
    for i, (image_id, votes) in enumerate(rows.items(), start=1):
        lines.append(' '.join(map(str, [i, image_id, *votes, 15, 21, 1396])))
        _image(root / 'images' / f'{image_id}.jpg', i * 30)
    (root / 'AVA.txt').write_text('\n'.join(lines) + '\n')


def test_ava_values_and_split_json(tmp_path):
    root, out = tmp_path / 'AVA_dataset', tmp_path / 'out'
    make_ava(root)
    split = _split_file(tmp_path, ['953417', '953777', '954222', '770556'], ['771289'])
    summary = ds.prepare('ava', root, out, split_json=split, val_fraction=0.0, progress=False)
    _check_csvs(out, summary)
    train, test = _read(out, 'train'), _read(out, 'test')
    got = {Path(p).stem: v for p, v in zip(train.filepath, train.value)}
    assert got == pytest.approx({'953417': 5.0, '953777': 9.5, '954222': 5.5})
    assert test.value.tolist() == pytest.approx([16 / 3], abs=1e-6)
    assert set(train.title) == {'Rank the image aesthetics.'}
    assert summary['dropped'] == {'no votes': 1}
    assert summary['splits']['val']['rows'] == 0 and not (out / 'val.csv').exists()


def test_ava_bad_line(tmp_path, capsys):
    root = tmp_path / 'AVA_dataset'
    make_ava(root)
    (root / 'AVA.txt').write_text('1 953417 0 0 0\n')
    rc, _, err = _run_cli(capsys, 'ava', '--root', str(root), '--out', str(tmp_path / 'o'))
    assert rc == 2 and 'AVA.txt line 1' in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------- Adience


ADIENCE_HEADER = ('user_id\toriginal_image\tface_id\tage\tgender\tx\ty\tdx\tdy\ttilt_ang\t'
                  'fiducial_yaw_angle\tfiducial_score')


def make_adience(root: Path, folder='aligned'):
    prefix = 'landmark_aligned_face' if folder == 'aligned' else 'coarse_tilt_aligned_face'
    ages = ['(0, 2)', '(4, 6)', '(8, 12)', '(15, 20)', '(25, 32)', '(38, 43)', '(48, 53)', '(60, 100)',
            'None', '(38, 42)', '35']
    expected = {}
    for fold in range(5):
        lines = [ADIENCE_HEADER]
        for j in range(4):
            age = ages[(fold * 4 + j) % len(ages)]
            user, face, image = f'{fold}0{j}@N0{fold}', str(100 * fold + j), f'{fold}{j}123_abc{j}_o.jpg'
            lines.append('\t'.join([user, image, face, age, 'f', '0', '0', '10', '10', '0', '0', '50']))
            _image(root / folder / user / f'{prefix}.{face}.{image}', fold * 40 + j)
            group = ds.adience_group(age)
            if group is not None:
                expected[f'landmark_aligned_face.{face}.{Path(image).stem}'] = (group, fold)
        (root / f'fold_{fold}_data.txt').write_text('\n'.join(lines) + '\n')
    return expected


def test_adience_age_groups():
    assert [ds.adience_group(a) for a in ('(0, 2)', '(60, 100)', ' (25,32) ', 'None', '(38, 42)', '35', '')] == \
        [0, 7, 4, None, None, None, None]


def test_adience_folds(tmp_path):
    root, out = tmp_path / 'adience', tmp_path / 'out'
    expected = make_adience(root)
    summary = ds.prepare('adience', root, out, test_fold=1, val_fraction=0.0, progress=False)
    _check_csvs(out, summary)
    frames = {s: _read(out, s) for s in ('train', 'test')}
    for split, df in frames.items():
        for p, v in zip(df.filepath, df.value):
            key = Path(p).name.rsplit('.', 1)[0]
            group, fold = expected[key]
            assert v == group
            assert (fold == 1) == (split == 'test')
    assert sum(len(df) for df in frames.values()) == len(expected)
    assert summary['dropped'] == {'age not one of the 8 groups': 20 - len(expected)}
    assert set(frames['train'].title) == {'Rank the age of the person.'}
    assert all('/aligned/' in p for p in frames['train'].filepath)


def test_adience_faces_and_split_json(tmp_path):
    root, out = tmp_path / 'adience', tmp_path / 'out'
    expected = make_adience(root, folder='faces')
    ids = sorted(expected)
    split = _split_file(tmp_path, ids[:-3], ids[-3:])
    summary = ds.prepare('adience', root, out, split_json=split, val_fraction=0.0, progress=False)
    _check_csvs(out, summary)
    test = _read(out, 'test')
    assert sorted('landmark' + Path(p).name[len('coarse_tilt'):].rsplit('.', 1)[0] for p in test.filepath) \
        == ids[-3:]
    assert all('/faces/' in p for p in test.filepath)


# ------------------------------------------------------------------------------------------- HCI


def make_hci(top: Path, per=4):
    base = top / 'HistoricalColor-ECCV2012' / 'data' / 'imgs' / 'decade_database'
    for d, decade in enumerate(ds.HCI_DECADES):
        for j in range(per):
            _image(base / decade / f'{d}{j}aa{"%026d" % j}.jpg', d * 50 + j)
    (base / '1950s' / '.DS_Store').write_text('x')
    return base


def test_hci(tmp_path):
    base = make_hci(tmp_path / 'dl')
    out = tmp_path / 'out'
    summary = ds.prepare('hci', tmp_path / 'dl', out, progress=False)  # found below the download folder
    _check_csvs(out, summary)
    alldf = pd.concat(_read(out, s) for s in ds.SPLIT_NAMES)
    assert len(alldf) == 20 and [summary['splits'][s]['rows'] for s in ds.SPLIT_NAMES] == [14, 2, 4]
    for p, v in zip(alldf.filepath, alldf.value):
        assert ds.HCI_DECADES[v] == Path(p).parent.name
    assert set(alldf.title) == {'Rank the decade of the photo.'} and set(alldf.cname) == {'decade'}
    # the official ids are decade_<stem>; the decade_database folder itself works as --root too
    stems = sorted(Path(p).stem for p in alldf.filepath)
    split = _split_file(tmp_path, [f'decade_{s}' for s in stems[:15]], [f'decade_{s}' for s in stems[15:]])
    summary = ds.prepare('hci', base, tmp_path / 'out2', split_json=split, val_fraction=0.0, progress=False)
    assert sorted(Path(p).stem for p in _read(tmp_path / 'out2', 'test').filepath) == stems[15:]
    assert summary['splits']['train']['rows'] == 15


# ------------------------------------------------------------------------------------------- counting


def make_coco(root: Path):
    cats = [{'id': 19, 'name': 'horse'}, {'id': 53, 'name': 'apple'}]
    spec = {'train2017': {1: {19: 3}, 2: {19: 1, 53: 2}, 3: {53: 1}, 4: {19: 2}, 5: {19: 1}, 6: {53: 4}},
            'val2017': {360661: {19: 3}, 16228: {19: 1, 53: 1}}}
    for split, images in spec.items():
        anns, imgs = [], []
        for image_id, counts in images.items():
            name = f'{image_id:012d}.jpg'
            imgs.append({'id': image_id, 'file_name': name, 'width': 8, 'height': 8})
            _image(root / split / name, image_id)
            for cat, n in counts.items():
                anns += [{'id': len(anns) + 1, 'image_id': image_id, 'category_id': cat, 'iscrowd': 0}
                         for _ in range(n)]
        # a crowd region is not an instance
        anns.append({'id': len(anns) + 1, 'image_id': next(iter(images)), 'category_id': 19, 'iscrowd': 1})
        (root / 'annotations').mkdir(parents=True, exist_ok=True)
        (root / 'annotations' / f'instances_{split}.json').write_text(
            json.dumps({'images': imgs, 'annotations': anns, 'categories': cats}))
    return spec


def test_count(tmp_path):
    root, out = tmp_path / 'coco', tmp_path / 'out'
    spec = make_coco(root)
    summary = ds.prepare('count', root, out, val_fraction=0.2, progress=False)
    _check_csvs(out, summary)
    frames = {s: _read(out, s) for s in ds.SPLIT_NAMES}
    assert all('/val2017/' in p for p in frames['test'].filepath)
    assert all('/train2017/' in p for s in ('train', 'val') for p in frames[s].filepath)
    for split, df in frames.items():
        for p, title, cname, v in zip(df.filepath, df.title, df.cname, df.value):
            assert title == f'Rank the numbers of {cname}.'
            image_id = int(Path(p).stem)
            cat = {'horse': 19, 'apple': 53}[cname]
            source = spec['val2017'] if split == 'test' else spec['train2017']
            assert v == source[image_id][cat]
    # an image with two categories sits in one split
    split_of = {}
    for split, df in frames.items():
        for p in df.filepath:
            assert split_of.setdefault(p, split) == split
    # the official weights: 1 / (values in the category * rows with that value)
    train = pd.concat([frames['train'], frames['val']])
    ds.write_csv_atomic(out / 'w.csv', [ds.Item(p, (p,), c, t, int(v)) for p, t, c, v in
                                          zip(train.filepath, train.title, train.cname, train.value)])
    w = pd.read_csv(out / 'w.csv', sep='\t')
    horse = w[w.cname == 'horse']
    expect = {1: 1 / (3 * 2), 2: 1 / (3 * 1), 3: 1 / (3 * 1)}
    assert [expect[v] for v in horse.value] == pytest.approx(horse.sample_weights_by_class.tolist())
    assert summary['splits']['test']['rows'] == 3
    assert summary['splits']['train']['value_min'] >= 1


def test_count_filters(tmp_path):
    root, out = tmp_path / 'coco', tmp_path / 'out'
    make_coco(root)
    summary = ds.prepare('count', root, out, categories=['apple'], max_count=2, progress=False)
    alldf = pd.concat(_read(out, s) for s in ds.SPLIT_NAMES if summary['splits'][s]['rows'])
    assert set(alldf.cname) == {'apple'} and alldf.value.max() <= 2
    assert summary['dropped'] == {'count outside --min-count/--max-count': 1}
    with pytest.raises(ds.DatasetLayoutError, match='zebra'):
        ds.prepare('count', root, out, categories=['zebra'], progress=False)


# ------------------------------------------------------------------------------------------- errors


MAKERS = {'koniq': make_koniq, 'ava': make_ava, 'adience': make_adience, 'hci': make_hci, 'count': make_coco}


@pytest.mark.parametrize('name, remove, expected', [
    ('koniq', 'koniq10k_scores_and_distributions.csv', 'koniq10k_scores_and_distributions.csv'),
    ('koniq', '1024x768', '1024x768'),
    ('ava', 'AVA.txt', 'AVA.txt'),
    ('ava', 'images', 'images'),
    ('adience', 'fold_3_data.txt', 'fold_3_data.txt'),
    ('adience', 'aligned', 'aligned'),
    ('hci', 'HistoricalColor-ECCV2012/data/imgs/decade_database/1970s', '1970s'),
    ('hci', 'HistoricalColor-ECCV2012', '1930s'),
    ('count', 'annotations', 'instances_val2017.json'),
    ('count', 'val2017', 'val2017'),
])
def test_missing_files(tmp_path, capsys, name, remove, expected):
    import shutil
    root = tmp_path / name
    MAKERS[name](root)
    target = root / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    rc, stdout, err = _run_cli(capsys, name, '--root', str(root), '--out', str(tmp_path / 'out'))
    assert rc == 2 and stdout == ''
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('open_clip_rank.prepare_datasets: error:')
    assert str(root) in lines[0] and expected in lines[0]
    assert not (tmp_path / 'out' / 'train.csv').exists()


def test_missing_images_and_skip(tmp_path, capsys):
    root = tmp_path / 'koniq10k'
    make_koniq(root)
    (root / '1024x768' / '1004.jpg').unlink()
    rc, _, err = _run_cli(capsys, 'koniq', '--root', str(root), '--out', str(tmp_path / 'out'))
    assert rc == 2 and str(root / '1024x768' / '1004.jpg') in err and '--skip-missing' in err
    rc, stdout, _ = _run_cli(capsys, 'koniq', '--root', str(root), '--out', str(tmp_path / 'out'),
                             '--skip-missing')
    assert rc == 0 and 'left out: 1 row(s), image file missing' in stdout
    assert sum(len(_read(tmp_path / 'out', s)) for s in ds.SPLIT_NAMES) == 9


def test_split_json_of_another_dataset(tmp_path, capsys):
    root = tmp_path / 'koniq10k'
    make_koniq(root)
    split = _split_file(tmp_path, ['landmark_aligned_face.1.x'], ['landmark_aligned_face.2.y'])
    rc, _, err = _run_cli(capsys, 'koniq', '--root', str(root), '--out', str(tmp_path / 'o'),
                          '--split-json', str(split))
    assert rc == 2 and 'another dataset' in err
    (tmp_path / 'bad.json').write_text('{"train": []}')
    rc, _, err = _run_cli(capsys, 'koniq', '--root', str(root), '--out', str(tmp_path / 'o'),
                          '--split-json', str(tmp_path / 'bad.json'))
    assert rc == 2 and 'train_id' in err


def test_instruction_override_and_checks(tmp_path):
    root = tmp_path / 'koniq10k'
    make_koniq(root)
    summary = ds.prepare('koniq', root, tmp_path / 'o', instruction='Sort the images by sharpness.',
                         cname='sharpness', progress=False)
    assert set(_read(tmp_path / 'o', 'train').title) == {'Sort the images by sharpness.'}
    assert summary['instruction'] == 'Sort the images by sharpness.'
    with pytest.raises(ValueError, match='must appear'):
        ds.prepare('koniq', root, tmp_path / 'o', instruction='Sort by sharpness.', progress=False)


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / 'train.csv'
    path.write_text('old\n')

    def boom(items):
        raise RuntimeError('boom')
    monkeypatch.setattr(ds, 'class_weights', boom)
    with pytest.raises(RuntimeError):
        ds.write_csv_atomic(path, [ds.Item('/x.jpg', ('x',), 'c', 'Rank the c.', 1)])
    assert path.read_text() == 'old\n' and os.listdir(tmp_path) == ['train.csv']


def test_official_split_file_parses(tmp_path):
    """A split file laid out as the official examples/HCI-split.json (written here; the official file is not
    shipped): one JSON object, ``train_id`` and ``test_id`` lists of ``decade_<file stem>`` ids, no ``val_id``,
    an HCI-sized 1060 / 265 split."""
    stems = [f'{decade[:4]}{k:04d}' for decade in ds.HCI_DECADES for k in range(265)]  # 5 * 265 = 1325 images
    ids = [f'decade_{stem}' for stem in stems]
    (tmp_path / 'HCI-split.json').write_text(json.dumps({'train_id': ids[::5] + ids[1::5] + ids[2::5] + ids[3::5],
                                                         'test_id': ids[4::5]}, indent=4))
    mapping = ds.load_split_json(tmp_path / 'HCI-split.json')
    assert Counter(mapping.values()) == {'train': 1060, 'test': 265}
    assert all(i.startswith('decade_') for i in mapping)
    assert mapping['decade_19300000'] == 'train' and mapping['decade_19300004'] == 'test'
