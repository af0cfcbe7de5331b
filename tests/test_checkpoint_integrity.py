"""Damaged checkpoints are found on every route: cut at any offset, a flipped bit in tensor data, in the pickle or
in the zip's headers; the plugin's checksum and, for files without one, the zip's own CRC-32s.

Routes: ``files.integrity.verify_file`` (what every route calls), ``open_clip.create_model(pretrained=PATH)``,
``load_rank_model`` (the rank CLI's ``--checkpoint-path``), the rank CLI itself, ``--resume PATH`` / ``--resume
latest`` (``load_resume_checkpoint``) and the training start checks (``--pretrained PATH`` / ``--resume PATH``,
refused before OpenCLIP creates ``logs/<name>``: tests/test_interrupted_runs.py runs those through ``main``).
"""
import struct
from types import SimpleNamespace

import pytest
import torch

import open_clip
from open_clip_rank import CheckpointMismatchError
from open_clip_rank.files import checkpoints as cf
from open_clip_rank.files import integrity
from open_clip_rank.files.checkpoints import UnreadableCheckpointError
from open_clip_rank.inference import load_rank_model
from helpers import call_main, zip_records

pytestmark = pytest.mark.unit

MODEL = 'tiny-vit-adapter'


def _training_checkpoint(model, epoch=3):
    """Laid out as OpenCLIP's training saves it: DDP prefixes, optimizer state, scaler."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return {'epoch': epoch, 'name': 'run', 'state_dict': {f'module.{k}': v for k, v in model.state_dict().items()},
            'optimizer': optimizer.state_dict()}


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp('integrity')
    torch.manual_seed(0)
    model = open_clip.create_model(MODEL).eval()
    checkpoint = _training_checkpoint(model)
    with_checksum, without = root / 'with_checksum.pt', root / 'official.pt'
    torch.save(integrity.add_checksum(checkpoint), with_checksum)
    torch.save(checkpoint, without)
    return {'root': root, 'model': model, 'checksum': with_checksum, 'plain': without}


def _biggest_tensor_record(path):
    records = zip_records(path)
    return max((v for k, v in records.items() if '/data/' in k), key=lambda v: v[1])


def _central_directory(data):
    (offset,) = struct.unpack('<I', data[-6:-2])  # end-of-central-directory record: offset of the directory
    return offset


def _damaged(source, tmp_path, damage):
    """A copy of ``source`` with one kind of damage."""
    data = bytearray(source.read_bytes())
    if damage.startswith('cut_'):
        at = {'cut_1': 1, 'cut_4': 4, 'cut_5000': 5000, 'cut_20000': 20000, 'cut_60000': 60000,
              'cut_middle': len(data) // 2, 'cut_central_directory': _central_directory(data) + 10,
              'cut_last_10': len(data) - 10}[damage]
        assert at < len(data)
        data = data[:at]
    else:
        start, length = {'flip_tensor_data': lambda: _biggest_tensor_record(source),
                         'flip_tensor_data_end': lambda: _biggest_tensor_record(source),
                         'flip_pickle': lambda: next(v for k, v in zip_records(source).items() if k.endswith('data.pkl')),
                         }.get(damage, lambda: (0, 0))()
        at = {'flip_tensor_data': start + length // 3, 'flip_tensor_data_end': start + length - 1,
              'flip_pickle': start + length // 2, 'flip_zip_magic': 1,
              'flip_central_directory_magic': _central_directory(data) + 2}[damage]
        data[at] ^= 0x10
    path = tmp_path / f'{damage}.pt'
    path.write_bytes(bytes(data))
    return path


DAMAGES = ['cut_1', 'cut_4', 'cut_5000', 'cut_20000', 'cut_60000', 'cut_middle', 'cut_central_directory',
           'cut_last_10', 'flip_tensor_data', 'flip_tensor_data_end', 'flip_pickle', 'flip_zip_magic',
           'flip_central_directory_magic']


def test_the_test_files_are_large_enough_for_every_offset(files):
    assert files['checksum'].stat().st_size > 100_000
    assert integrity.verify_file(files['checksum']) is None and integrity.verify_file(files['plain']) is None


@pytest.mark.parametrize('damage', DAMAGES)
@pytest.mark.parametrize('kind', ['checksum', 'plain'])
def test_every_damage_is_found_with_and_without_the_checksum(files, tmp_path, damage, kind):
    damaged = _damaged(files[kind], tmp_path, damage)
    reason = integrity.verify_file(damaged)
    assert reason is not None, f'{damage} of a {kind} checkpoint verified'
    if damage.startswith('flip_tensor') and kind == 'checksum':
        assert 'checksum mismatch' in reason
    with pytest.raises(UnreadableCheckpointError, match=rf'{damage}\.pt cannot be read \(.+\): it is truncated or '
                                                         r'corrupt\. Fix it\.$'):
        cf.check_readable(damaged, fix='Fix it.')


def test_the_checksum_covers_values_besides_tensors(files, tmp_path):
    checkpoint = torch.load(files['checksum'], weights_only=True)
    assert integrity.checksum_mismatch(checkpoint) is None
    checkpoint['epoch'] = 4  # e.g. a flipped bit in the pickle that still unpickles
    assert 'checksum mismatch' in integrity.checksum_mismatch(checkpoint)
    odd = {'state_dict': {'bf16': torch.randn(3, 2).bfloat16(), 'scalar': torch.tensor(2.5), 'empty': torch.zeros(0),
                          'view': torch.arange(10.)[2:8:2], 'bool': torch.tensor([True, False])},
           'sizes': [torch.Size([2, 3]), (1, 'a', None)], 'dtype': torch.float16}
    torch.save(integrity.add_checksum(odd), tmp_path / 'odd.pt')
    assert integrity.verify_file(tmp_path / 'odd.pt') is None
    assert integrity.checksum_mismatch(torch.load(tmp_path / 'odd.pt', weights_only=True)) is None


def test_a_zip_without_crcs_falls_back_to_the_checksum(files, tmp_path):
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(integrity.add_checksum({'state_dict': files['model'].state_dict()}), tmp_path / 'nocrc.pt')
        torch.save({'state_dict': files['model'].state_dict()}, tmp_path / 'nocrc_plain.pt')
    finally:
        torch.serialization.set_crc32_options(True)
    assert integrity.verify_file(tmp_path / 'nocrc.pt') is None
    assert integrity.verify_file(tmp_path / 'nocrc_plain.pt') is None  # nothing to check against: accepted
    flipped = _damaged(tmp_path / 'nocrc.pt', tmp_path, 'flip_tensor_data')
    assert 'checksum mismatch' in integrity.verify_file(flipped)


@pytest.mark.parametrize('damage', ['cut_1', 'cut_20000', 'flip_tensor_data', 'flip_pickle'])
def test_every_loading_route_refuses_the_damaged_file(files, tmp_path, damage):
    for kind in ('checksum', 'plain'):
        damaged = _damaged(files[kind], tmp_path, f'{damage}')
        expected = rf'{damage}\.pt cannot be read'
        with pytest.raises(UnreadableCheckpointError, match=expected):
            open_clip.create_model(MODEL, pretrained=str(damaged))
        with pytest.raises(UnreadableCheckpointError, match=expected):
            open_clip.create_model('tiny-vit', pretrained=str(damaged))  # a plain OpenCLIP model too
        with pytest.raises(UnreadableCheckpointError, match=expected):
            load_rank_model(MODEL, checkpoint_path=str(damaged), device='cpu')
        explicit = SimpleNamespace(rank_resume_latest=False, resume=str(damaged))
        with pytest.raises(SystemExit, match=rf'^open_clip_rank: error: checkpoint \S*{expected}'):
            cf.load_resume_checkpoint(lambda p, map_location=None: torch.load(p, map_location=map_location),
                                      str(damaged), run_args=explicit)
        damaged.unlink()


def test_rank_cli_refuses_a_flipped_checkpoint_in_one_line(files, tmp_path):
    from open_clip_rank.rank import main
    from PIL import Image
    images = tmp_path / 'images'
    images.mkdir()
    Image.new('RGB', (32, 32), 'red').save(images / 'a.png')
    damaged = _damaged(files['checksum'], tmp_path, 'flip_tensor_data')
    result = call_main(main, ['--model', MODEL, '--checkpoint-path', damaged, '--images', images, '--prompt', 'Rank.',
                              '--output-path', tmp_path / 'out', '--device', 'cpu', '--no-progress'])
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert 'flip_tensor_data.pt cannot be read' in last and 'checksum mismatch' in last, result.stderr[-2000:]
    assert not (tmp_path / 'out.csv').exists()


def test_resume_latest_falls_back_past_a_flipped_bit(files, tmp_path):
    folder = tmp_path / 'checkpoints'
    folder.mkdir()
    for epoch in (1, 2):
        torch.save(integrity.add_checksum({**torch.load(files['checksum'], weights_only=True), 'epoch': epoch}),
                   folder / f'epoch_{epoch}.pt')
    flipped = _damaged(folder / 'epoch_2.pt', tmp_path, 'flip_tensor_data')
    flipped.replace(folder / 'epoch_2.pt')
    run = SimpleNamespace(rank_resume_latest=True, resume=str(folder / 'epoch_2.pt'))
    checkpoint = cf.load_resume_checkpoint(lambda p, map_location=None: torch.load(p, map_location=map_location),
                                           run.resume, map_location='cpu', run_args=run)
    assert checkpoint['epoch'] == 1 and run.resume.endswith('epoch_1.pt')


def test_fsspec_seek_error_on_a_cut_file_counts_as_damage():
    import errno
    assert cf.is_unreadable_error(OSError(errno.EINVAL, 'Invalid argument'))
    assert not cf.is_unreadable_error(OSError(errno.EACCES, 'Permission denied'))


def test_a_logit_bias_checkpoint_into_a_model_without_one_is_one_line(tmp_path):
    siglip = open_clip.create_model('tiny-vit', init_logit_bias=-10.0)
    torch.save({'epoch': 1, 'state_dict': siglip.state_dict()}, tmp_path / 'siglip.pt')
    with pytest.raises(CheckpointMismatchError, match=r"siglip\.pt does not fit this model: it has 'logit_bias'"):
        open_clip.create_model('tiny-vit', pretrained=str(tmp_path / 'siglip.pt'))
    rank_siglip = open_clip.create_model(MODEL, init_logit_bias=-10.0)
    torch.save(rank_siglip.state_dict(), tmp_path / 'rank_siglip.pt')
    with pytest.raises(CheckpointMismatchError, match=r"rank_siglip\.pt does not fit this model"):
        open_clip.create_model(MODEL, pretrained=str(tmp_path / 'rank_siglip.pt'))
