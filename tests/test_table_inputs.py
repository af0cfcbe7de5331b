"""Damaged and hostile data tables (issue #19): text columns read as text, whole-word category swaps, targets the
negatives would outrank, encodings, list-file lines, and where relative image paths resolve."""
import csv
import json
import os
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from open_clip_rank.data import RankDataError, RankDataset, RankTable, load_rank_table
from open_clip_rank.data.ordinal_dataset import load_ordinal_table, split_list_line
from open_clip_rank.data.rank import _table_for, rank_shard_records, read_rank_rows
from open_clip_rank.data.rank_shards import RankBuckets
from open_clip_rank.data.table import has_category_word, swap_category
from helpers import call_main

pytestmark = pytest.mark.unit

HEADER = ['filepath', 'title', 'cname', 'value']


def _image(path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.new('RGB', (8, 8), (120, 30, 30)).save(path)
    return str(path)


def _csv(path, rows, header=HEADER, encoding='utf-8'):
    """A tab-separated table written as given (rows are lists of cell texts)."""
    text = '\n'.join('\t'.join(map(str, r)) for r in [header, *rows]) + '\n'
    with open(path, 'wb') as f:
        f.write(text.encode(encoding) if isinstance(encoding, str) else encoding(text))
    return str(path)


def _rows(tmp_path, n=2, kinds=('age', 'quality')):
    """n rows per category, absolute image paths, captions holding the category as a word."""
    return [[_image(tmp_path / f'{kind}{i}.png'), f'Rank the {kind} of the person in the image.', kind, i]
            for kind in kinds for i in range(n)]


def _args(path, **kw):
    base = {'model': 'tiny-vit-adapter', 'csv': path, 'train_data': path, 'val_data': None, 'csv_img_key': 'filepath',
            'csv_caption_key': 'title', 'csv_value_key': 'value', 'csv_category_key': 'cname',
            'csv_weight_key': 'sample_weights_by_class', 'csv_separator': '\t', 'negative_ratio': 0.2,
            'train_with_relevance_score': False, 'image_root': None, 'csv_relative_paths': False,
            'dataset_type': 'csv'}
    return SimpleNamespace(**{**base, **kw})


def _one_line(info):
    message = str(info.value)
    assert '\n' not in message, message
    return message


# --- 1. text columns are text; empty instructions and categories are refused ---------------------------------

def test_empty_title_is_refused_everywhere_with_file_row_and_fix(tmp_path):
    rows = _rows(tmp_path)
    rows[2][1] = ''  # row 4 of the file (header is row 1)
    path = _csv(tmp_path / 'data.csv', rows)
    readers = {
        'training, --negative-ratio 0': lambda: _table_for(_args(path, negative_ratio=0.0), path, is_train=True),
        'validation': lambda: _table_for(_args(path), path, is_train=False),
        'rank CLI': lambda: read_rank_rows(_args(path)),
        'make_shards': lambda: list(rank_shard_records(_args(path, negative_ratio=0.0))),
    }
    for where, read in readers.items():
        with pytest.raises(RankDataError) as info:
            read()
        message = _one_line(info)
        assert path in message and "'title'" in message and 'row 4' in message, where
        assert 'fill it in or remove the row' in message, where


def test_empty_title_in_make_shards_exits_2_without_nan_captions(tmp_path):
    from open_clip_rank.make_shards import main
    rows = _rows(tmp_path)
    rows[0][1] = '   '
    path = _csv(tmp_path / 'data.csv', rows)
    result = call_main(main, [path, tmp_path / 'shards', '--negative-ratio', '0', '--no-progress'])
    assert result.returncode == 2 and "row 2" in result.stderr and "empty 'title'" in result.stderr
    assert not (tmp_path / 'shards').exists() or not list((tmp_path / 'shards').iterdir())


def test_categories_and_captions_that_look_like_missing_values_stay_text(tmp_path):
    rows = [[_image(tmp_path / f'{i}.png'), f'Rank the {c} images.', c, i]
            for i, c in enumerate(['NA', 'None', 'null'])]
    rows.append([_image(tmp_path / 'n.png'), 'nan', 'nan', 3])
    table = load_rank_table(_csv(tmp_path / 'data.csv', rows), check_category_in_caption=True)
    assert table.category_names == ['NA', 'None', 'nan', 'null']
    assert table.captions[0] == 'Rank the NA images.' and table.captions[3] == 'nan'
    assert table.values.tolist() == [0.0, 1.0, 2.0, 3.0]  # the value column still parses as numbers


def test_empty_category_and_empty_path_are_refused(tmp_path):
    rows = _rows(tmp_path)
    rows[1][2] = ''
    with pytest.raises(RankDataError) as info:
        load_rank_table(_csv(tmp_path / 'cat.csv', rows))
    assert "row 3" in _one_line(info) and "empty 'cname'" in str(info.value) and 'cat.csv' in str(info.value)
    rows = _rows(tmp_path)
    rows[3][0] = ''
    with pytest.raises(RankDataError, match=r"path.csv has 1 row\(s\) with an empty 'filepath' .*row 5"):
        load_rank_table(_csv(tmp_path / 'path.csv', rows))


def test_values_parse_as_numbers_and_missing_ones_are_refused(tmp_path):
    rows = _rows(tmp_path)
    rows[0][3], rows[1][3] = ' 2.5', '1e3'
    assert load_rank_table(_csv(tmp_path / 'ok.csv', rows)).values[:2].tolist() == [2.5, 1000.0]
    for bad in ('', 'NA', 'nan', 'inf'):
        rows[2][3] = bad
        with pytest.raises(RankDataError, match=rf"column 'value' must be numeric and finite.*row 4: '{bad}'"):
            load_rank_table(_csv(tmp_path / 'bad.csv', rows))


# --- 2. negatives re-word whole words only -----------------------------------------------------------------

def test_swap_replaces_whole_words_only():
    caption = 'Rank the age of the person in the image.'
    assert swap_category(caption, 'age', 'quality') == 'Rank the quality of the person in the image.'
    assert swap_category('age: age-group, ages, age.', 'age', 'x') == 'x: x-group, ages, x.'
    assert swap_category('Rank the c++ code, not cc++.', 'c++', r'go\1') == r'Rank the go\1 code, not cc++.'
    assert swap_category("Rank l'âge here.", 'âge', 'qualité') == "Rank l'qualité here."
    assert has_category_word(caption, 'age') and not has_category_word('Rank the image.', 'age')


def test_negative_captions_from_the_csv_sampler_keep_other_words(tmp_path):
    names = ['age', 'quality']
    table = RankTable(['a.png', 'b.png'], ['Rank the age of the person in the image.', 'Rank the image quality.'],
                      np.array([0, 1]), names, np.array([3.0, 4.0]), None, 'x.csv')
    dataset = RankDataset(table, None, tokenizer=None)
    caption, target, category = dataset._caption(0, 1)  # row 0 (age) as a negative in a quality batch
    assert caption == 'Rank the quality of the person in the image.' and target == 0.0 and category == 1
    assert dataset._caption(1, 0)[0] == 'Rank the image age.'


def test_negative_captions_from_the_shard_stream_keep_other_words():
    captions = []

    def tokenizer(texts):
        captions.append(texts[0])
        return [torch.tensor([len(captions) - 1])]

    samples = [{'image': torch.zeros(1), 'caption': f'Rank the {c} of the person in the image.', 'value': 1.0,
                'category': c, 'weight': 1.0} for c in ['age', 'quality'] * 6]
    batches = list(RankBuckets(4, 0.5, tokenizer)(iter(samples)))
    assert batches and all('imquality' not in c and 'imqu' not in c for c in captions)
    assert set(captions) == {'Rank the age of the person in the image.', 'Rank the quality of the person in the image.'}


def test_start_check_refuses_captions_without_their_category_as_a_word(tmp_path):
    rows = _rows(tmp_path)
    rows[1][1] = 'Rank the person in the image.'  # 'age' only inside 'image': the swap would mangle it
    path = _csv(tmp_path / 'data.csv', rows)
    with pytest.raises(RankDataError) as info:
        _table_for(_args(path), path, is_train=True)
    message = _one_line(info)
    assert path in message and 'row 3' in message and 'whole word' in message and '--negative-ratio 0' in message
    assert len(_table_for(_args(path, negative_ratio=0.0), path, is_train=True)) == 4  # no negatives: no swap
    with pytest.raises(RankDataError, match='whole word'):  # make_shards checks as training does
        list(rank_shard_records(_args(path)))


# --- 3. values the negatives would outrank; values beyond float32 --------------------------------------------

def test_values_below_the_negatives_target_are_refused_when_negatives_are_drawn(tmp_path):
    rows = _rows(tmp_path)
    rows[2][3] = '-1.5'
    path = _csv(tmp_path / 'data.csv', rows)
    with pytest.raises(RankDataError) as info:
        _table_for(_args(path), path, is_train=True)
    message = _one_line(info)
    assert path in message and "row 4: '-1.5'" in message and 'below 0' in message
    assert '--negative-ratio 0' in message and 'shift the values' in message
    with pytest.raises(RankDataError, match=r"row 4: '-1.5'"):
        list(rank_shard_records(_args(path)))
    # no negatives (ratio 0, validation, the rank CLI) or relevance targets |value - Y|: negative values are fine
    assert _table_for(_args(path, negative_ratio=0.0), path, is_train=True).values.min() == -1.5
    assert _table_for(_args(path), path, is_train=False).values.min() == -1.5
    assert _table_for(_args(path, train_with_relevance_score=True), path, is_train=True).values.min() == -1.5
    assert min(r['target'] for r in read_rank_rows(_args(path))) == -1.5


def test_values_beyond_float32_are_always_refused(tmp_path):
    rows = _rows(tmp_path)
    rows[1][3] = '-1e39'
    path = _csv(tmp_path / 'data.csv', rows)
    for read in (lambda: _table_for(_args(path, negative_ratio=0.0), path, is_train=True),
                 lambda: read_rank_rows(_args(path))):
        with pytest.raises(RankDataError) as info:
            read()
        message = _one_line(info)
        assert path in message and "row 3: '-1e39'" in message and 'float32' in message and 'rescale' in message
    rows[1][3] = '3.4e38'  # within range
    assert load_rank_table(_csv(tmp_path / 'ok.csv', rows)).values[1] == 3.4e38


# --- 4. encodings --------------------------------------------------------------------------------------------

@pytest.mark.parametrize('codec, order', [('utf-16', None), ('utf-16-be', 'big-endian'),
                                          ('utf-16-le', 'little-endian')])
def test_utf16_tables_are_named_as_such(tmp_path, codec, order):
    encode = (lambda t: t.encode(codec)) if codec == 'utf-16' else (lambda t: ('\ufeff' + t).encode(codec))
    path = _csv(tmp_path / 'data.csv', _rows(tmp_path), encoding=encode)
    for read in (lambda: load_rank_table(path), lambda: load_ordinal_table(path, 6)):
        with pytest.raises(RankDataError) as info:
            read()
        message = _one_line(info)
        assert path in message and 'UTF-16' in message and 'save it as UTF-8' in message
        assert order is None or order in message


def test_utf16_without_a_byte_order_mark_is_caught(tmp_path):
    path = _csv(tmp_path / 'data.csv', _rows(tmp_path), encoding=lambda t: t.encode('utf-16-le'))
    with pytest.raises(RankDataError, match=r'data.csv holds NUL bytes .*UTF-16.*save it as UTF-8'):
        load_rank_table(path)


def test_latin1_tables_name_file_byte_line_and_fix(tmp_path):
    rows = _rows(tmp_path)
    rows[1][1] = 'Rank the âge of the person.'
    rows[1][2] = 'âge'
    path = _csv(tmp_path / 'data.csv', rows, encoding='latin-1')
    offset = (tmp_path / 'data.csv').read_bytes().index(b'\xe2')
    for read in (lambda: load_rank_table(path), lambda: load_ordinal_table(path, 6),
                 lambda: read_rank_rows(_args(path))):
        with pytest.raises(RankDataError) as info:
            read()
        message = _one_line(info)
        assert path in message and 'not UTF-8' in message and f'byte offset {offset}' in message
        assert 'byte 0xE2' in message and '(line 3)' in message and 'save it as UTF-8' in message
    listing = tmp_path / 'train.txt'
    listing.write_bytes('a.png 1\nâ.png 2\n'.encode('latin-1'))
    with pytest.raises(RankDataError, match=r'train.txt is not UTF-8 text: .*\(line 2\).*save it as UTF-8'):
        load_ordinal_table(str(listing), 6)


def test_utf8_with_a_byte_order_mark_reads(tmp_path):
    rows = _rows(tmp_path)
    rows[0][1], rows[0][2] = 'Rank the âge of the person.', 'âge'
    table = load_rank_table(_csv(tmp_path / 'data.csv', rows, encoding='utf-8-sig'), check_category_in_caption=True)
    assert 'âge' in table.category_names and len(table) == 4
    ordinal = _csv(tmp_path / 'ord.csv', [[_image(tmp_path / 'o.png'), 2]], header=['filepath', 'value'],
                   encoding='utf-8-sig')
    assert load_ordinal_table(ordinal, 6).labels == [[2]]  # told apart as a CSV: the mark is not in 'filepath'


# --- 5. ordinal list files: byte-order mark, spaces in paths -------------------------------------------------

def test_list_file_with_a_byte_order_mark_and_paths_with_spaces(tmp_path):
    _image(tmp_path / 'a.png')
    _image(tmp_path / 'my photos' / 'b c.png')
    listing = tmp_path / 'train.txt'
    listing.write_bytes('a.png 1\nmy photos/b c.png 4\nmy photos/b c.png\t1  2 3\n'.encode('utf-8-sig'))
    table = load_ordinal_table(str(listing), 6, image_root=str(tmp_path))
    assert table.paths == [str(tmp_path / 'a.png'), str(tmp_path / 'my photos/b c.png'),
                           str(tmp_path / 'my photos/b c.png')]
    assert table.labels == [[1], [4], [1, 2, 3]]  # several labels per image, as the official list files


def test_list_file_lines_split_before_the_trailing_labels():
    assert split_list_line('a.png 1 2 3') == ('a.png', ['1', '2', '3'])
    assert split_list_line('  dir/x y  z.jpg\t7 ') == ('dir/x y  z.jpg', ['7'])
    assert split_list_line('2021 photos/a.png 3') == ('2021 photos/a.png', ['3'])
    assert split_list_line('123 4') == ('123', ['4'])  # the first token is always path
    assert split_list_line('a.png') == ('a.png', [])
    assert split_list_line('   ') == (None, [])


def test_list_file_line_without_a_label_names_line_and_format(tmp_path):
    listing = tmp_path / 'val.txt'
    listing.write_text('my photo.png\n')
    with pytest.raises(RankDataError, match=r"val.txt line 1: label 'photo.png' is not an integer \(or 'my photo.png' "
                                            r"has no label\); list files hold 'path label"):
        load_ordinal_table(str(listing), 6, check_files=False)
    listing.write_text('a.png x\n')
    with pytest.raises(RankDataError, match=r"val.txt line 1: label 'x' is not an integer"):
        load_ordinal_table(str(listing), 6, check_files=False)
    listing.write_text('a.png 2.5\n')
    with pytest.raises(RankDataError, match=r"val.txt line 1: label '2.5' is not an integer"):
        load_ordinal_table(str(listing), 6, check_files=False)


# --- 6. where relative image paths resolve ---------------------------------------------------------------------

def _relative_csv(tmp_path):
    """data/train.csv listing images/x.png relative to data/ (the CSV's folder)."""
    rows = [[f'images/{kind}{i}.png', f'Rank the {kind} of the person.', kind, i]
            for kind in ('age', 'quality') for i in range(2)]
    for row in rows:
        _image(tmp_path / 'data' / row[0])
    return _csv(tmp_path / 'data' / 'train.csv', rows)


def test_relative_paths_resolve_against_image_root_or_the_csv_folder(tmp_path, monkeypatch):
    path = _relative_csv(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RankDataError) as info:  # default: the current folder, named in the error
        load_rank_table(path)
    message = _one_line(info)
    assert f'the current folder {tmp_path}' in message and '--image-root' in message
    assert '--csv-relative-paths' in message
    data = tmp_path / 'data'
    assert load_rank_table(path, image_root=str(data)).paths[0] == str(data / 'images/age0.png')
    assert load_rank_table(path, image_root='data').paths[0] == os.path.join('data', 'images/age0.png')
    assert load_rank_table(path, relative_to_table=True).paths[0] == str(data / 'images/age0.png')
    with pytest.raises(RankDataError, match=rf"resolved against --image-root {tmp_path}\)"):
        load_rank_table(path, image_root=str(tmp_path))
    (data / 'images' / 'age1.png').unlink()
    with pytest.raises(RankDataError, match=rf"do not exist: {data}/images/age1.png \(relative paths resolved "
                                            rf"against the folder of .*train.csv, {data},"):
        load_rank_table(path, relative_to_table=True)
    monkeypatch.chdir(data)  # absolute paths name no folder
    with pytest.raises(RankDataError) as info:
        load_rank_table(_csv(tmp_path / 'abs.csv', [['/no/such.png', 'Rank a.', 'a', 1]]))
    assert 'resolved against' not in str(info.value)


def test_image_root_and_csv_relative_paths_are_checked(tmp_path):
    path = _relative_csv(tmp_path)
    with pytest.raises(RankDataError, match=r'--image-root .* and --csv-relative-paths .*give one of them'):
        load_rank_table(path, image_root=str(tmp_path), relative_to_table=True)
    with pytest.raises(RankDataError, match=r'--image-root .*nowhere is not a folder'):
        load_rank_table(path, image_root=str(tmp_path / 'nowhere'))
    with pytest.raises(RankDataError, match=r'--image-root .*nowhere is not a folder'):
        load_ordinal_table(path, 6, image_root=str(tmp_path / 'nowhere'))


def test_training_reads_the_path_flags_for_every_sample_type(tmp_path):
    path = _relative_csv(tmp_path)
    data = tmp_path / 'data'
    for kw in ({'image_root': str(data)}, {'csv_relative_paths': True}):
        table = _table_for(_args(path, **kw), path, is_train=True)
        assert table.paths[0] == str(data / 'images/age0.png')
    ordinal = _csv(data / 'ord.txt', [['images/age0.png', 1], ['images/age1.png', 2]], header=['filepath', 'value'])
    from open_clip_rank.data.ordinal import _ordinal_table
    table = _ordinal_table(_args(ordinal, csv_relative_paths=True), ordinal, 6)
    assert table.paths == [str(data / 'images/age0.png'), str(data / 'images/age1.png')]


def test_training_flags_parse_and_refuse_bad_combinations():
    from open_clip_rank.integration.flags import check_plugin_args, plugin_parser
    parser = plugin_parser()
    args, _ = parser.parse_known_args(['--csv-dataset-sample-type', 'rank', '--csv-relative-paths'])
    assert args.csv_relative_paths is True and args.image_root is None
    help_text = parser.format_help()
    assert '--csv-relative-paths' in help_text and 'ordinal data resolve' not in help_text
    base = dict(vars(args), model='tiny-vit-adapter', train_data='x.csv', val_data=None, dataset_type='csv',
                accum_freq=1, batch_size=8)
    check_plugin_args(SimpleNamespace(**base))
    with pytest.raises(ValueError, match='--image-root and --csv-relative-paths .*give one of them'):
        check_plugin_args(SimpleNamespace(**{**base, 'image_root': 'x'}))
    with pytest.raises(ValueError, match=r"--image-root applies to the plugin's data .*drop --image-root"):
        check_plugin_args(SimpleNamespace(**{**base, 'image_root': 'x', 'csv_relative_paths': False,
                                             'csv_dataset_sample_type': 'default', 'model': 'ViT-B-32'}))


def test_make_shards_honours_the_path_flags(tmp_path):
    from open_clip_rank.make_shards import main
    path = _relative_csv(tmp_path)
    refused = call_main(main, [path, tmp_path / 's0', '--no-progress'], cwd=tmp_path)
    assert refused.returncode == 2 and f'the current folder {tmp_path}' in refused.stderr
    for flags, out in ((['--image-root', tmp_path / 'data'], 's1'), (['--csv-relative-paths'], 's2')):
        result = call_main(main, [path, tmp_path / out, '--no-progress', '--no-shuffle', *flags], cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        with tarfile.open(tmp_path / out / '000000.tar') as tar:
            metas = [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith('.json')]
        assert [m['category'] for m in metas] == ['age', 'age', 'quality', 'quality']
    both = call_main(main, [path, tmp_path / 's3', '--csv-relative-paths', '--image-root', tmp_path])
    assert both.returncode == 2 and 'give one' in both.stderr


def test_rank_cli_honours_the_path_flags(tmp_path):
    from open_clip_rank.rank import build_parser, main
    options = {o for a in build_parser()._actions for o in a.option_strings}
    assert {'--image-root', '--csv-relative-paths'} <= options
    path = _relative_csv(tmp_path)
    rows = read_rank_rows(build_parser().parse_args(['--csv', path, '--csv-relative-paths']))
    assert rows[0]['image'] == str(tmp_path / 'data' / 'images/age0.png')
    out = tmp_path / 'out' / 'ranked'
    result = call_main(main, ['--csv', path, '--image-root', tmp_path / 'data', '--model', 'tiny-vit-adapter',
                              '--random-weights', '--device', 'cpu', '--output-path', out, '--no-progress'],
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with open(out.with_suffix('.csv')) as f:
        ranked = list(csv.DictReader(f))
    assert len(ranked) == 4 and all(r['skipped'] == '' and r['rank'] for r in ranked)
    both = call_main(main, ['--csv', path, '--image-root', tmp_path, '--csv-relative-paths', '--model',
                            'tiny-vit-adapter', '--random-weights', '--output-path', tmp_path / 'o2'])
    assert both.returncode == 2 and 'give one of them' in both.stderr


def test_refused_training_starts_name_the_problem_before_logs(tmp_path):
    """Through OpenCLIP's parse_args: the sample type's data check runs before ``logs/<name>`` exists."""
    from helpers import run_openclip_main
    rows = _rows(tmp_path, n=4)
    rows[3][1] = ''
    empty = _csv(tmp_path / 'empty.csv', rows)
    rows = _rows(tmp_path, n=4)
    rows[5][3] = '-2'
    negative = _csv(tmp_path / 'negative.csv', rows)
    relative = _relative_csv(tmp_path)
    cases = [
        (['--train-data', empty, '--negative-ratio', '0'], f"{empty} has 1 row(s) with an empty 'title'"),
        (['--train-data', negative], "row 7: '-2'"),
        (['--train-data', relative, '--csv-relative-paths', '--image-root', tmp_path], 'give one of them'),
    ]
    for i, (flags, expected) in enumerate(cases):
        argv = ['--model', 'tiny-vit-adapter', '--dataset-type', 'csv', '--csv-dataset-sample-type', 'rank',
                '--batch-size', '4', '--workers', '0', '--name', f'run{i}', *flags]
        result = run_openclip_main(argv, tmp_path / 'runs', in_process=True)
        errors = [line for line in result.stderr.splitlines() if line.startswith('open_clip_rank: error:')]
        assert result.returncode == 2 and len(errors) == 1 and expected in errors[0], result.stderr[-2000:]
        assert not (tmp_path / 'runs' / 'logs' / f'run{i}').exists()
