"""Damaged files and hostile inputs: the package's one image decoder (files/images.py:open_rgb) and its callers.

16-bit greyscale scaled (not clipped to white), EXIF orientation applied, transparency on white, truncated files
unreadable unless asked for (--load-truncated-images: training, the rank CLI, make_shards), decompression bombs
unreadable, make_shards rejecting what does not decode (and naming each sample's source file), symlinked folders
searched once. Every file is generated here.
"""
import csv
import io
import json
import os
import pickle
import tarfile
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torchvision import transforms as T

from helpers import call_main, write_rank_csv
from open_clip_rank.files.images import UnreadableImageError, find_images, open_rgb, truncated_images

MODEL = 'tiny-vit-adapter'
GRADIENT = np.arange(256, dtype=np.uint16).reshape(16, 16)  # 8-bit levels k: 16-bit values 257 * k


# --- generated files -----------------------------------------------------------------------------------

def png16(path):
    """A 16-bit greyscale PNG (Pillow opens it as 'I;16') holding 257 * k for k = 0..255."""
    Image.fromarray(GRADIENT * 257).save(path)
    assert Image.open(path).mode in ('I;16', 'I')
    return str(path)


def jpeg_bytes(size=(64, 48), seed=0):
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, 'JPEG', quality=90)
    return buffer.getvalue()


def truncated_jpeg(path):
    """A JPEG cut at 60 %: its header opens, its pixels do not load (Pillow: 'image file is truncated')."""
    data = jpeg_bytes()
    Path(path).write_bytes(data[:int(len(data) * 0.6)])
    return str(path)


def exif_rotated(path, orientation=6):
    """40 x 20 stored pixels, red top-left corner, blue elsewhere; EXIF orientation 6 (display rotated 90° cw)."""
    image = Image.new('RGB', (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif)
    return str(path)


def _levels(image):
    array = np.asarray(image)
    assert image.mode == 'RGB' and array.dtype == np.uint8
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()
    return array[..., 0]


# --- open_rgb -------------------------------------------------------------------------------------------

@pytest.mark.unit
def test_16_bit_png_is_scaled_to_8_bits_not_clipped(tmp_path):
    path = png16(tmp_path / 'grad16.png')
    assert (np.asarray(Image.open(path).convert('RGB'))[..., 0] == 255).mean() > 0.99  # Pillow's convert: white
    for source in (path, Path(path), Path(path).read_bytes()):
        np.testing.assert_array_equal(_levels(open_rgb(source)), GRADIENT)
    with open(path, 'rb') as f:
        np.testing.assert_array_equal(_levels(open_rgb(f)), GRADIENT)


@pytest.mark.unit
@pytest.mark.parametrize('mode, values, expected', [
    ('I;16B', GRADIENT * 257, GRADIENT),
    ('I;16L', GRADIENT * 257, GRADIENT),
    ('I', (GRADIENT * 257).astype(np.int32), GRADIENT),  # a 16-bit PNG under older Pillow
    ('I', GRADIENT.astype(np.int32) * 1000 - 50000, GRADIENT),  # 32-bit range: min..max onto 0..255
    ('F', GRADIENT.astype(np.float32) / 255, GRADIENT),  # [0, 1]
    ('F', GRADIENT.astype(np.float32), GRADIENT),  # [0, 255]
    ('F', GRADIENT.astype(np.float32) * 257, GRADIENT),  # [0, 65535]
])
def test_wide_greyscale_modes_map_by_their_range(mode, values, expected):
    if mode.startswith('I;16'):
        image = Image.frombytes(mode, (16, 16), values.astype('>u2' if mode.endswith('B') else '<u2').tobytes())
    else:
        image = Image.fromarray(values)
    assert image.mode == mode
    np.testing.assert_array_equal(_levels(open_rgb(image)), expected)


@pytest.mark.unit
def test_float_image_with_nan_and_constant_images_decode():
    values = GRADIENT.astype(np.float32) * 1000
    values[0, 0] = np.nan
    levels = _levels(open_rgb(Image.fromarray(values)))
    assert levels[0, 0] == 0 and levels[-1, -1] == 255
    assert _levels(open_rgb(Image.fromarray(np.full((4, 4), -7.0, np.float32)))).max() == 0


@pytest.mark.unit
def test_exif_orientation_is_applied(tmp_path):
    for suffix in ('png', 'jpg'):
        path = exif_rotated(tmp_path / f'rotated.{suffix}')
        assert Image.open(path).size == (40, 20)
        image = open_rgb(path)
        assert image.size == (20, 40)  # width and height swapped
        # orientation 6: rotate 90° clockwise, so the stored top-left corner is shown top-right
        top_right, top_left = image.getpixel((17, 2)), image.getpixel((2, 2))
        assert top_right[0] > 200 and top_right[2] < 60, top_right
        assert top_left[2] > 200 and top_left[0] < 60, top_left


@pytest.mark.unit
def test_transparency_is_composited_on_white_and_cmyk_converts():
    clear = Image.new('RGBA', (4, 4), (0, 0, 0, 0))
    half = Image.new('RGBA', (4, 4), (0, 0, 0, 128))
    assert open_rgb(clear).getpixel((0, 0)) == (255, 255, 255)
    assert open_rgb(half).getpixel((0, 0)) == (127, 127, 127)
    assert open_rgb(Image.new('LA', (4, 4), (0, 0))).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new('P', (4, 4), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info['transparency'] = 0
    buffer = io.BytesIO()
    palette.save(buffer, 'PNG')
    assert open_rgb(buffer.getvalue()).getpixel((0, 0)) == (255, 255, 255)
    assert open_rgb(Image.new('CMYK', (4, 4), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.unit
def test_unreadable_files_raise_oserror_with_a_readable_reason(tmp_path):
    (tmp_path / 'empty.jpg').write_bytes(b'')
    (tmp_path / 'text.jpg').write_text('not an image, just text\n')
    with pytest.raises(UnreadableImageError, match='empty file'):
        open_rgb(b'')
    with pytest.raises(UnreadableImageError, match=r"cannot identify image file \(12 bytes, starting b'hello"):
        open_rgb(b'hello, world')
    for name in ('empty.jpg', 'text.jpg'):
        with pytest.raises(OSError, match=name):
            open_rgb(tmp_path / name)


@pytest.mark.unit
def test_decompression_bombs_are_unreadable(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 2000)
    Image.new('RGB', (50, 50)).save(tmp_path / 'warns.png')  # 2500 pixels: Pillow only warns
    Image.new('RGB', (80, 80)).save(tmp_path / 'errors.png')  # 6400 > 2 x limit: Pillow's error
    for name in ('warns.png', 'errors.png'):
        with pytest.raises(UnreadableImageError, match='DecompressionBomb'):
            open_rgb(tmp_path / name)
    assert open_rgb(png16(tmp_path / 'small.png')).size == (16, 16)


@pytest.mark.unit
def test_truncated_jpeg_is_unreadable_unless_asked_for(tmp_path):
    path = truncated_jpeg(tmp_path / 'cut.jpg')
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(OSError, match='truncated'):
        open_rgb(path)
    assert open_rgb(path, load_truncated=True).size == (64, 48)
    with truncated_images():
        assert open_rgb(path).size == (64, 48)
        with pytest.raises(OSError, match='truncated'):
            open_rgb(path, load_truncated=False)
    with pytest.raises(OSError, match='truncated'):
        open_rgb(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # Pillow's global is set only around the load


# --- the callers ----------------------------------------------------------------------------------------

def _rank_csv(tmp_path, extra):
    """A rank CSV of generated images plus ``extra`` (path, category) rows."""
    csv_path = write_rank_csv(tmp_path, kinds=('circle', 'square'), counts=range(3), per_count=2)
    with open(csv_path, 'a') as f:
        f.writelines(f"{path}\tRank the numbers of {kind}.\t{kind}\t1\n" for path, kind in extra)
    return csv_path


def _dataset(csv_path):
    from open_clip_rank.data import RankDataset, load_rank_table
    table = load_rank_table(csv_path)
    return table, RankDataset(table, T.ToTensor(), list, replace_unreadable=False)


@pytest.mark.unit
def test_training_dataset_decodes_16_bit_and_skips_truncated_by_default(tmp_path, caplog):
    from open_clip_rank.integration.run_state import end_run, start_run
    grad, cut = png16(tmp_path / 'grad16.png'), truncated_jpeg(tmp_path / 'cut.jpg')
    table, dataset = _dataset(_rank_csv(tmp_path, [(grad, 'circle'), (cut, 'square')]))
    rows = {path: i for i, path in enumerate(table.paths)}
    image = dataset[rows[grad]][0]
    np.testing.assert_array_equal((image[0] * 255).round().numpy().astype(np.uint16), GRADIENT)
    assert dataset[rows[cut]] is None and dataset.num_skipped == 1
    assert f'Skipping unreadable image {cut}' in caplog.text and 'truncated' in caplog.text
    start_run(Namespace(load_truncated_images=True))  # what --load-truncated-images sets for the run
    try:
        _, lenient = _dataset(table.source)
    finally:
        end_run()
    assert lenient.load_truncated_images is True
    travelled = pickle.loads(pickle.dumps(lenient))  # how a spawned data worker receives it: no run there
    assert travelled[rows[cut]][0].shape == (3, 48, 64) and travelled.num_skipped == 0


@pytest.mark.unit
def test_ordinal_dataset_takes_the_flag_of_the_run(tmp_path):
    from open_clip_rank.data.ordinal_dataset import OrdinalDataset, load_ordinal_table
    from open_clip_rank.integration.run_state import end_run, start_run
    cut = truncated_jpeg(tmp_path / 'cut.jpg')
    (tmp_path / 'o.csv').write_text(f"filepath\tvalue\n{cut}\t1\n")
    table = load_ordinal_table(tmp_path / 'o.csv', num_ranks=3)
    assert OrdinalDataset(table, T.ToTensor(), train=False).load_truncated_images is False
    start_run(Namespace(load_truncated_images=True))
    try:
        dataset = OrdinalDataset(table, T.ToTensor(), train=False)
    finally:
        end_run()
    assert dataset.load_truncated_images is True


@pytest.mark.e2e
def test_the_flag_reaches_spawned_data_workers(tmp_path):
    from open_clip_rank.integration.run_state import end_run, start_run
    cut = truncated_jpeg(tmp_path / 'cut.jpg')
    csv_path = _rank_csv(tmp_path, [(cut, 'square')])
    for allowed in (False, True):
        start_run(Namespace(load_truncated_images=allowed))
        try:
            table, dataset = _dataset(csv_path)
        finally:
            end_run()
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=1,
                                             multiprocessing_context='spawn')
        row = table.paths.index(cut)
        sample = list(loader)[row]
        assert (sample is not None) == allowed


def _shard(path, samples):
    """A tar of (key, {ext: bytes}) samples, as make_shards writes them (written here to hold bad images)."""
    with tarfile.open(path, 'w') as tar:
        for key, entries in samples:
            for ext, data in entries.items():
                info = tarfile.TarInfo(f'{key}.{ext}')
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def _decoded(url, **kwargs):
    import webdataset as wds

    from open_clip_rank.data.rank_shards import decode_rank_samples
    from open_clip_rank.data.shards import SkipCounter
    counter = SkipCounter()
    pipeline = wds.DataPipeline(wds.SimpleShardList(url), wds.tarfile_to_samples())
    return list(decode_rank_samples(pipeline, T.ToTensor(), counter, **kwargs)), counter


@pytest.mark.unit
def test_shard_reader_decodes_16_bit_and_names_the_source_of_a_skip(tmp_path, caplog):
    meta = {'value': 1.0, 'category': 'a', 'caption': 'Rank a.'}
    cut = truncated_jpeg(tmp_path / 'cut.jpg')
    url = _shard(tmp_path / 's.tar', [
        ('000', {'png': Path(png16(tmp_path / 'grad16.png')).read_bytes(), 'json': json.dumps(meta).encode()}),
        ('001', {'jpg': Path(cut).read_bytes(), 'json': json.dumps({**meta, 'source_path': cut}).encode()})])
    out, counter = _decoded(url)
    assert len(out) == 1 and counter.skipped == 1
    np.testing.assert_array_equal((out[0]['image'][0] * 255).round().numpy().astype(np.uint16), GRADIENT)
    assert f'(from {cut})' in caplog.text and 'truncated' in caplog.text
    out, counter = _decoded(url, load_truncated=True)
    assert len(out) == 2 and counter.skipped == 0


@pytest.mark.unit
def test_inference_loads_16_bit_exif_and_truncated_with_the_option(tmp_path):
    from open_clip_rank.inference import load_images
    grad, cut = png16(tmp_path / 'grad16.png'), truncated_jpeg(tmp_path / 'cut.jpg')
    rotated = exif_rotated(tmp_path / 'rotated.png')
    tensors, kept, skipped = load_images([grad, rotated, cut], T.ToTensor())
    assert kept == [0, 1] and [i for i, _ in skipped] == [2] and 'truncated' in skipped[0][1]
    np.testing.assert_array_equal((tensors[0][0] * 255).round().numpy().astype(np.uint16), GRADIENT)
    assert tensors[1].shape == (3, 40, 20)
    with truncated_images():
        tensors, kept, skipped = load_images([cut], T.ToTensor())
    assert kept == [0] and not skipped


@pytest.mark.unit
def test_rank_cli_ranks_16_bit_as_its_8_bit_twin_and_truncated_only_with_the_flag(tmp_path):
    from open_clip_rank.rank import main
    folder = tmp_path / 'images'
    folder.mkdir()
    png16(folder / 'a_grad16.png')
    Image.fromarray(GRADIENT.astype(np.uint8)).save(folder / 'b_grad8.png')
    Image.new('L', (16, 16), 255).save(folder / 'c_white.png')  # what Pillow's convert('RGB') made of a_grad16
    cut = truncated_jpeg(folder / 'd_cut.jpg')
    base = ['--model', MODEL, '--random-weights', '--device', 'cpu', '--images', folder, '--prompt',
            'Rank the numbers of circle.', '--no-progress']
    for flag in ([], ['--load-truncated-images']):
        out = tmp_path / f'ranked{len(flag)}'
        result = call_main(main, base + ['--output-path', out] + flag)
        assert result.returncode == 0, result.stderr
        with open(out.with_suffix('.csv')) as f:
            rows = {Path(r['image']).name: r for r in csv.DictReader(f)}
        assert rows['a_grad16.png']['score'] == rows['b_grad8.png']['score'] != rows['c_white.png']['score']
        assert bool(rows['d_cut.jpg']['skipped']) == (not flag)
        skipped = json.loads(out.with_suffix('.json').read_text())['skipped']
        assert [s['image'] for s in skipped] == ([] if flag else [cut])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.unit
def test_contact_sheet_thumbnails_decode_like_ranking(tmp_path):
    from open_clip_rank.pictures.contact_sheet import _thumbnail
    thumb = _thumbnail(png16(tmp_path / 'grad16.png'), 96)
    assert np.asarray(thumb).min() < 10 and np.asarray(thumb).max() > 245  # a gradient, not white


@pytest.mark.unit
def test_training_flag_parses_and_sets_pils_global_for_openclips_loaders(monkeypatch):
    from open_clip_rank.integration.flags import configure_run, plugin_parser
    monkeypatch.setattr(ImageFile, 'LOAD_TRUNCATED_IMAGES', False)  # restored after the test
    assert plugin_parser().parse_known_args([])[0].load_truncated_images is False
    args = plugin_parser().parse_known_args(['--load-truncated-images'])[0]
    assert args.load_truncated_images is True
    configure_run(Namespace(**vars(plugin_parser().parse_known_args([])[0])))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    configure_run(args)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


# --- make_shards ----------------------------------------------------------------------------------------

def _shard_samples(out):
    samples = {}
    for name in sorted(os.listdir(out)):
        if name.endswith('.tar'):
            with tarfile.open(os.path.join(out, name)) as tar:
                for member in tar:
                    key, ext = member.name.split('.', 1)
                    samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


@pytest.mark.unit
def test_make_shards_rejects_what_does_not_decode_and_names_sources(tmp_path, monkeypatch, caplog):
    from open_clip_rank.make_shards import main
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 3500)  # the generated images (64 x 48 at most) stay below it
    bad = tmp_path / 'bad'
    bad.mkdir()
    (bad / 'empty.jpg').write_bytes(b'')
    (bad / 'text.jpg').write_text('a text file named like an image\n')
    cut = truncated_jpeg(bad / 'cut.jpg')
    Image.new('RGB', (100, 100)).save(bad / 'bomb.png')  # over twice the limit: Pillow's error
    Image.new('RGB', (60, 60)).save(bad / 'bomb_warns.png')  # over the limit: Pillow's warning
    rejects = sorted(str(p) for p in bad.iterdir())
    good = [png16(tmp_path / 'grad16.png'), exif_rotated(tmp_path / 'rotated.jpg'),
            exif_rotated(tmp_path / 'rotated.tif')]  # a tif is re-encoded (as a png), oriented
    csv_path = _rank_csv(tmp_path, [(p, 'circle') for p in good + rejects])
    num_generated = 12

    result = call_main(main, [csv_path, tmp_path / 'out', '--shard-size', 5, '--no-progress'])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == str(num_generated + len(good))
    samples = _shard_samples(tmp_path / 'out')
    sources = {json.loads(s['json'])['source_path']: s for s in samples.values()}
    assert len(sources) == len(samples) == num_generated + len(good)  # every json names its image file
    assert set(good) <= set(sources) and not set(rejects) & set(sources)
    for path in rejects:
        assert f'skipped unreadable image {path}' in caplog.text
    assert f'{len(rejects)} unreadable image(s) left out of the shards' in caplog.text
    summary = caplog.text.split('left out of the shards:')[1]
    assert all(path in summary for path in rejects) and 'empty file' in summary and 'DecompressionBomb' in summary
    assert sources[good[0]]['png'] == Path(good[0]).read_bytes()  # kept formats are copied as they are
    assert Image.open(io.BytesIO(sources[good[2]]['png'])).size == (20, 40)

    caplog.clear()
    result = call_main(main, [csv_path, tmp_path / 'lenient', '--shard-size', 5, '--no-progress',
                              '--load-truncated-images'])
    assert result.returncode == 0, result.stderr
    sources = {json.loads(s['json'])['source_path']: s for s in _shard_samples(tmp_path / 'lenient').values()}
    assert cut in sources and set(sources[cut]) == {'png', 'json'}  # stored complete, re-encoded
    assert open_rgb(sources[cut]['png']).size == (64, 48)  # readable without the option
    assert f'{len(rejects) - 1} unreadable image(s) left out of the shards' in caplog.text


# --- finding images -------------------------------------------------------------------------------------

def _symlink(target, link):
    try:
        os.symlink(target, link, target_is_directory=os.path.isdir(target))
    except (OSError, NotImplementedError) as err:
        pytest.skip(f'symlinks unavailable here ({err})')


@pytest.mark.unit
def test_find_images_follows_symlinked_folders_once_and_survives_loops(tmp_path):
    root, outside = tmp_path / 'root', tmp_path / 'outside'
    (root / 'a').mkdir(parents=True)
    (outside / 'deeper').mkdir(parents=True)
    for path in (root / 'a' / 'x.png', outside / 'y.png', outside / 'deeper' / 'z.jpg'):
        Image.new('RGB', (4, 4)).save(path)
    _symlink(outside, root / 'linked')  # a symlinked subfolder: searched
    _symlink(outside, root / 'twice')  # the same folder again: not listed twice
    _symlink(root, root / 'a' / 'loop')  # a loop: must not hang
    _symlink(outside, outside / 'deeper' / 'back')  # a loop outside the searched folder
    found = find_images(root)
    assert found == sorted([str(root / 'a' / 'x.png'), str(root / 'linked' / 'y.png'),
                            str(root / 'linked' / 'deeper' / 'z.jpg')])
