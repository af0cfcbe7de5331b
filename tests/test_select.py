"""``python -m open_clip_rank.select``: curation of a score folder (threshold / top fraction, overall or per
prompt), the DataComp uid file, resharding into shards OpenCLIP reads back, the score-bucket picture, refusals."""
import argparse
import hashlib
import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import call_main

pytestmark = pytest.mark.unit

NAN = float('nan')
# two prompts, 12 samples (3 shards of 4): a tie at 0.5 under A, a NaN under A, key 000009 high under both
SCORES = {'A': [0.9, 0.1, 0.5, 0.5, NAN, 0.3, 0.7, 0.5, 0.2, 0.8, 0.6, 0.4],
          'B': [0.35, 0.95, 0.15, 0.55, 0.45, 0.85, 0.05, 0.65, 0.25, 0.75, 0.0, 0.5]}
IDENTITY = {'model': 'tiny', 'checkpoint_sha256': None, 'prompts': ['A', 'B'], 'precision': 'fp32'}


def _key(n):
    return f'{n:06d}'


def _uid(n):
    return hashlib.md5(_key(n).encode()).hexdigest()  # 32 hex digits, as DataComp's uids


def _png(n, size=8):
    buffer = io.BytesIO()
    Image.new('RGB', (size, size), (20 * n % 256, 255 - 7 * n, 3 * n)).save(buffer, format='PNG')
    return buffer.getvalue()


def _sample_files(n):
    return {'png': _png(n), 'txt': f'caption of sample {n}'.encode(),
            'json': json.dumps({'uid': _uid(n), 'caption': f'caption of sample {n}'}).encode()}


def _select(argv):
    from open_clip_rank.select import main
    return call_main(main, argv)


@pytest.fixture(scope='module')
def scored_shards(tmp_path_factory):
    """3 source shards (png + txt + json with uid per sample, as webdataset writes them) and their score folder."""
    import webdataset as wds
    from open_clip_rank.scoring.outputs import write_manifest, write_partition
    root = tmp_path_factory.mktemp('select')
    folder = root / 'scores'
    write_manifest(folder, {**IDENTITY, 'inputs': 'shards'})
    for s in range(3):
        url = str(root / 'src' / f'{s:06d}.tar')
        Path(url).parent.mkdir(exist_ok=True)
        with wds.TarWriter(url, encoder=False) as sink:
            for n in range(4 * s, 4 * s + 4):
                sink.write({'__key__': _key(n), **_sample_files(n)})
        rows = [{'key': _key(n), 'prompt': p, 'score': SCORES[p][n], 'url': url, 'uid': _uid(n)}
                for n in range(4 * s, 4 * s + 4) for p in ('A', 'B')]
        write_partition(folder, f'{s:06d}', rows, IDENTITY, skipped=[])
    return root, folder


def _table(folder):
    from open_clip_rank.scoring.curation import read_selection_table
    return read_selection_table(folder)


def _keys(table, prompt=None):
    return sorted(k for k, p in zip(table['key'].to_pylist(), table['prompt'].to_pylist()) if prompt in (None, p))


def test_threshold_keeps_exactly_the_rows_at_or_above_it(scored_shards):
    from open_clip_rank.scoring.curation import select_rows
    table = _table(scored_shards[1])
    kept = select_rows(table, threshold=0.5)
    assert _keys(kept, 'A') == [_key(n) for n in (0, 2, 3, 6, 7, 9, 10)]
    assert _keys(kept, 'B') == [_key(n) for n in (1, 3, 5, 7, 9, 11)]
    assert min(kept['score'].to_pylist()) == 0.5 and kept.num_rows == 13
    assert kept['score'].to_pylist() == sorted(kept['score'].to_pylist(), reverse=True)  # best first


def test_top_fraction_is_an_exact_count_overall_and_per_prompt(scored_shards):
    from open_clip_rank.scoring.curation import select_indices, select_rows
    table = _table(scored_shards[1])
    # per prompt: A has 11 scored rows (one NaN), ceil(0.25 * 11) = 3; B has 12, ceil(3.0) = 3
    kept = select_rows(table, top_fraction=0.25, per_prompt=True)
    assert _keys(kept, 'A') == [_key(n) for n in (0, 6, 9)] and _keys(kept, 'B') == [_key(n) for n in (1, 5, 9)]
    # ties at the cut split by key: A's ceil(0.5 * 11) = 6 best are 0.9, 0.8, 0.7, 0.6 and two of the three 0.5s
    _, summary = select_indices(table, top_fraction=0.5, per_prompt=True)
    kept = select_rows(table, top_fraction=0.5, per_prompt=True)
    assert _keys(kept, 'A') == [_key(n) for n in (0, 2, 3, 6, 9, 10)]
    assert [(g['prompt'], g['rows'], g['scored'], g['kept'], g['cut']) for g in summary] == [
        ('A', 12, 11, 6, 0.5), ('B', 12, 12, 6, 0.5)]
    # overall: 23 scored rows, ceil(5.75) = 6 rows from both prompts; sample 000009 is kept under both
    kept = select_rows(table, top_fraction=0.25)
    assert sorted(zip(kept['prompt'].to_pylist(), kept['key'].to_pylist())) == [
        ('A', _key(0)), ('A', _key(6)), ('A', _key(9)), ('B', _key(1)), ('B', _key(5)), ('B', _key(9))]
    # 0.3 * 10 is 3.0000000000000004 in binary: still 3 rows, not 4
    assert select_rows(table.slice(0, 10), top_fraction=0.3).num_rows == 3


def test_lowest_keeps_the_lowest_and_nan_is_never_kept(scored_shards):
    from open_clip_rank.scoring.curation import select_rows
    table = _table(scored_shards[1])
    kept = select_rows(table, threshold=0.2, lowest=True)
    assert sorted(zip(kept['prompt'].to_pylist(), kept['key'].to_pylist())) == [
        ('A', _key(1)), ('A', _key(8)), ('B', _key(2)), ('B', _key(6)), ('B', _key(10))]
    kept = select_rows(table, top_fraction=2 / 11, per_prompt=True, lowest=True)
    assert _keys(kept, 'A') == [_key(1), _key(8)]
    everything = select_rows(table, top_fraction=1.0, per_prompt=True)
    assert _keys(everything, 'A') == [_key(n) for n in range(12) if n != 4] and len(_keys(everything, 'B')) == 12
    assert not any(math.isnan(s) for s in select_rows(table, threshold=-1e9, lowest=False)['score'].to_pylist())
    assert _key(4) not in _keys(select_rows(table, threshold=-1e9), 'A')


def test_other_score_columns_and_null_scores():
    import pyarrow as pa
    from open_clip_rank.scoring.curation import CurationError, select_rows
    table = pa.table({'key': ['a', 'b', 'c', 'd'], 'prompt': [None] * 4, 'score': [1.0, 2.0, 3.0, 4.0],
                      'expected_rank': pa.array([3, None, 1, 2], pa.int64())})
    assert select_rows(table, top_fraction=0.5, column='expected_rank')['key'].to_pylist() == ['a', 'd']
    assert select_rows(table, top_fraction=0.5, column='expected_rank', lowest=True)['key'].to_pylist() == ['c', 'd']
    with pytest.raises(CurationError, match="no column 'nope'"):
        select_rows(table, threshold=1, column='nope')
    with pytest.raises(CurationError, match='not numbers'):
        select_rows(table, threshold=1, column='key')


def test_cli_writes_kept_rows_datacomp_uids_and_summary(scored_shards, tmp_path):
    import pyarrow.parquet as pq
    _, folder = scored_shards
    out = tmp_path / 'kept'
    result = _select([folder, '--top-fraction', '0.25', '--output', out])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == 'kept 5 samples (6 of 24 rows)'
    kept = pq.read_table(out / 'kept.parquet')
    assert set(kept.column_names) == {'key', 'prompt', 'url', 'uid', 'score'} and kept.num_rows == 6
    uids = np.load(out / 'kept_uids.npy')
    assert uids.dtype == np.dtype('u8,u8')
    expected = sorted((int(_uid(n)[:16], 16), int(_uid(n)[16:], 16)) for n in (0, 1, 5, 6, 9))
    assert [tuple(int(v) for v in u) for u in uids] == expected  # sorted, each sample once (000009: two prompts)
    summary = json.loads((out / 'selection.json').read_text())
    assert summary['rule'] == {'threshold': None, 'top_fraction': 0.25, 'per_prompt': False, 'score_column': 'score',
                               'lowest': False}
    assert (summary['rows'], summary['rows_scored'], summary['rows_kept'], summary['samples_kept']) == (24, 23, 6, 5)
    assert summary['uids'] == {'file': 'kept_uids.npy', 'format': 'datacomp', 'count': 5}
    assert summary['groups'] == [{'prompt': None, 'rows': 24, 'scored': 23, 'kept': 6, 'cut': 0.7}]
    assert summary['model'] == 'tiny' and summary['shards'] is None
    # a second selection into the same folder is refused (selection.json is written last: present means done)
    again = _select([folder, '--top-fraction', '0.25', '--output', out])
    assert again.returncode == 2 and 'already holds a selection' in again.stderr


def test_keys_fall_back_when_there_is_no_datacomp_uid(tmp_path):
    from open_clip_rank.scoring.outputs import write_partition
    folder = tmp_path / 'scores'
    images = []
    for n in range(6):
        path = tmp_path / 'images' / f'img{n}.png'
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(_png(n, 16))
        images.append(str(path))
    rows = [{'key': p, 'prompt': 'Rank it.', 'score': float(n), 'path': p} for n, p in enumerate(images)]
    write_partition(folder, '000000', rows, IDENTITY, skipped=[])
    result = _select([folder, '--threshold', '3', '--output', tmp_path / 'out'])
    assert result.returncode == 0, result.stderr
    keys = np.load(tmp_path / 'out' / 'kept_uids.npy')
    assert keys.dtype.kind == 'U' and keys.tolist() == sorted(images[3:])
    assert json.loads((tmp_path / 'out' / 'selection.json').read_text())['uids']['format'] == 'keys'
    # uids that are not DataComp's 32 hex digits: the keys as well
    from open_clip_rank.scoring.curation import uid_array
    import pyarrow as pa
    array, kind = uid_array(pa.table({'key': ['b', 'a'], 'uid': ['x1', _uid(1)]}))
    assert kind == 'keys' and array.tolist() == ['a', 'b']
    # --reshard needs shards
    refused = _select([folder, '--threshold', '3', '--output', tmp_path / 'out2', '--reshard'])
    assert refused.returncode == 2 and "'url' column" in refused.stderr and len(refused.stderr.splitlines()) == 1


def _tar_members(path):
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def test_reshard_writes_every_kept_sample_once_and_openclip_reads_them_back(scored_shards, tmp_path):
    root, folder = scored_shards
    out = tmp_path / 'kept'
    # per prompt, top half: 6 rows per prompt, 10 distinct samples (000003 and 000009 kept under both)
    result = _select([folder, '--top-fraction', '0.5', '--per-prompt', '--output', out, '--reshard',
                      '--shard-max-samples', '4'])
    assert result.returncode == 0, result.stderr
    kept_numbers = sorted({0, 2, 3, 6, 9, 10} | {1, 3, 5, 7, 9, 11})
    url, count = result.stdout.strip().splitlines()[-1].split()
    assert url == f"{out / 'shards'}/kept-{{000000..000002}}.tar" and int(count) == len(kept_numbers) == 10
    shards = sorted((out / 'shards').glob('kept-*.tar'))
    assert [p.name for p in shards] == ['kept-000000.tar', 'kept-000001.tar', 'kept-000002.tar']
    assert json.loads((out / 'shards' / 'sizes.json').read_text()) == {
        'kept-000000.tar': 4, 'kept-000001.tar': 4, 'kept-000002.tar': 2}
    assert not list((out / 'shards').glob('.*'))  # atomic: no temporary left
    # every kept sample exactly once, every file of it with its name and bytes unchanged
    members = [m for p in shards for m in _tar_members(p)]
    expected = [(f'{_key(n)}.{ext}', data) for n in kept_numbers for ext, data in sorted(_sample_files(n).items())]
    assert sorted(members) == sorted(expected) and len(members) == len(expected)

    # ... and OpenCLIP's own webdataset training pipeline reads them back (sizes.json gives the count)
    from open_clip_train.data import get_wds_dataset
    args = argparse.Namespace(train_data=url, train_num_samples=None, dataset_resampled=False, seed=0,
                              batch_size=1, workers=0, world_size=1, train_data_upsampling_factors=None)
    info = get_wds_dataset(args, lambda image: np.asarray(image), is_train=True, tokenizer=lambda text: [text])
    seen = []
    for images, texts in info.dataloader:
        seen.append((texts[0], np.asarray(images[0]).tobytes()))
    assert info.dataloader.num_samples == 10
    expected = [(f'caption of sample {n}', np.asarray(Image.open(io.BytesIO(_png(n))).convert('RGB')).tobytes())
                for n in kept_numbers]
    assert sorted(seen) == sorted(expected)
    summary = json.loads((out / 'selection.json').read_text())
    assert summary['shards']['samples'] == 10 and summary['samples_kept'] == 10


def test_reshard_names_samples_missing_from_their_shard(tmp_path):
    import webdataset as wds
    from open_clip_rank.scoring.outputs import write_partition
    url = str(tmp_path / 'src.tar')
    with wds.TarWriter(url, encoder=False) as sink:
        sink.write({'__key__': _key(0), **_sample_files(0)})
    rows = [{'key': _key(n), 'prompt': 'A', 'score': 1.0, 'url': url, 'uid': _uid(n)} for n in (0, 1)]
    write_partition(tmp_path / 'scores', '000000', rows, IDENTITY, skipped=[])
    result = _select([tmp_path / 'scores', '--threshold', '0', '--output', tmp_path / 'out', '--reshard'])
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert f'{_key(1)} in {url}' in result.stderr and 'changed since scoring' in result.stderr
    assert not (tmp_path / 'out' / 'selection.json').exists()


def test_plot_draws_a_histogram_and_a_row_per_bucket(scored_shards, tmp_path):
    from open_clip_rank.pictures.score_buckets import picture_size
    from open_clip_rank.scoring.curation import score_buckets
    _, folder = scored_shards
    table = _table(folder)
    sections = score_buckets(table, buckets=4, per_bucket=2)
    assert [s['prompt'] for s in sections] == ['A', 'B']  # several prompts: one section each
    assert [b['count'] for b in sections[0]['buckets']] == [2, 3, 3, 3]  # 11 scored rows of A, equal counts
    assert [b['count'] for b in sections[1]['buckets']] == [3, 3, 3, 3]
    assert sections[1]['buckets'][0] == {**sections[1]['buckets'][0], 'low': 0.75, 'high': 0.95}
    picture = tmp_path / 'buckets.png'
    result = _select([folder, '--plot', picture, '--buckets', '4', '--samples-per-bucket', '2'])
    assert result.returncode == 0, result.stderr
    with Image.open(picture) as image:
        assert image.size == picture_size(sections, 2)  # 2 sections x (histogram + 4 bucket rows)
    # deciles by default, with the cut of a rule; the images come from the shards
    result = _select([folder, '--plot', picture, '--threshold', '0.5'])
    assert result.returncode == 0, result.stderr
    deciles = score_buckets(table, per_bucket=8)
    assert [len(s['buckets']) for s in deciles] == [10, 10]
    with Image.open(picture) as image:
        assert image.size == picture_size(deciles, 8)


def test_plot_reads_images_from_files_and_shards(scored_shards, tmp_path):
    from open_clip_rank.scoring.curation import images_by_key
    root, folder = scored_shards
    url = str(root / 'src' / '000001.tar')
    found = images_by_key([{'key': _key(5), 'url': url}, {'key': 'x.png', 'path': '/data/x.png'}])
    assert found == {(url, _key(5)): _png(5), (None, 'x.png'): '/data/x.png'}


@pytest.mark.parametrize('argv, message', [
    ([], 'give the score folder'),
    (['{empty}', '--threshold', '1'], 'holds no score files'),
    (['{scores}', '--threshold', '1', '--top-fraction', '0.5'], 'two rules'),
    (['{scores}', '--top-fraction', '0'], 'must lie in (0, 1]'),
    (['{scores}', '--top-fraction', '1.5'], 'must lie in (0, 1]'),
    (['{scores}'], 'give a rule'),
    (['{scores}', '--threshold', '1', '--score-column', 'aesthetic'], "no column 'aesthetic'"),
    (['{scores}', '--threshold', '1', '--reshard'], '--reshard writes into --output'),
    (['{scores}', '--threshold', 'abc'], "invalid float value: 'abc'"),
    (['{missing}', '--threshold', '1'], 'is not a folder'),
    (['{scores}', '--scores', '{scores}', '--threshold', '1'], 'give the score folder once'),
    (['{scores}', '--threshold', '5', '--output', '{out}', '--reshard'], 'keeps no sample'),
    (['{scores}', '--plot', '{out}/p.png', '--output', '{out}'], '--output needs a rule'),
])
def test_bad_input_is_one_line_and_exit_status_2(scored_shards, tmp_path, argv, message):
    (tmp_path / 'empty').mkdir()
    paths = {'empty': tmp_path / 'empty', 'scores': scored_shards[1], 'missing': tmp_path / 'nowhere',
             'out': tmp_path / 'out'}
    result = _select([a.format(**paths) for a in argv])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('open_clip_rank.select: error: ') and message in lines[0], \
        result.stderr
