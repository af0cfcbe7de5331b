"""Checkpoint files: damage detection, atomic writes, the --resume latest fallback (no training needed)."""
from types import SimpleNamespace

import pytest
import torch

from open_clip_rank.files import atomic
from open_clip_rank.files import checkpoints as cf

pytestmark = pytest.mark.unit


def _save(path, epoch):
    torch.save({'epoch': epoch, 'state_dict': {'w': torch.full((64,), float(epoch))}}, path)
    return path


def _cut(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def _pt_load(path, map_location=None):  # OpenCLIP's pt_load, as far as these tests are concerned
    return torch.load(path, map_location=map_location)


def test_structural_check_finds_truncation(tmp_path):
    good = _save(tmp_path / 'good.pt', 1)
    assert cf.unreadable_reason(good) is None
    assert 'zip' in cf.unreadable_reason(_cut(_save(tmp_path / 'cut.pt', 2)))
    (tmp_path / 'empty.pt').write_bytes(b'')
    assert cf.unreadable_reason(tmp_path / 'empty.pt') == 'the file is empty'
    with pytest.raises(cf.UnreadableCheckpointError, match=r'cut\.pt cannot be read .* Fix it\.$'):
        cf.check_readable(tmp_path / 'cut.pt', fix='Fix it.')


def test_damage_errors_are_told_from_other_load_errors():
    assert cf.is_unreadable_error(RuntimeError('PytorchStreamReader failed reading zip archive: failed finding '
                                               'central directory'))
    assert cf.is_unreadable_error(EOFError())
    assert not cf.is_unreadable_error(RuntimeError("Error(s) in loading state_dict: size mismatch for w"))
    import pickle
    assert not cf.is_unreadable_error(pickle.UnpicklingError('Weights only load failed. ...'))


def test_atomic_writes_leave_old_file_or_new_file_never_a_temporary(tmp_path):
    target = tmp_path / 'out.json'
    target.write_text('old')
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_write(target) as f:
            f.write('half')
            raise KeyboardInterrupt
    assert target.read_text() == 'old' and [p.name for p in tmp_path.iterdir()] == ['out.json']

    def interrupted_save(obj, path, *args, **kwargs):
        torch.save(obj, path)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic.atomic_torch_save(interrupted_save, {'x': 1}, tmp_path / 'epoch_1.pt')
    assert [p.name for p in tmp_path.iterdir()] == ['out.json']
    atomic.atomic_torch_save(torch.save, {'x': 2}, tmp_path / 'epoch_1.pt')
    assert torch.load(tmp_path / 'epoch_1.pt')['x'] == 2
    assert not atomic.temporary_name(tmp_path / 'epoch_1.pt').endswith('.pt')  # never a --resume latest candidate


def test_resume_latest_falls_back_to_the_newest_readable_checkpoint(tmp_path, caplog):
    for epoch in (1, 2, 9, 10):
        _save(tmp_path / f'epoch_{epoch}.pt', epoch)
    _cut(tmp_path / 'epoch_10.pt')
    _cut(tmp_path / 'epoch_9.pt')
    run = SimpleNamespace(rank_resume_latest=True, resume=str(tmp_path / 'epoch_10.pt'))
    checkpoint = cf.load_resume_checkpoint(_pt_load, run.resume, map_location='cpu', run_args=run)
    assert checkpoint['epoch'] == 2 and run.resume == str(tmp_path / 'epoch_2.pt')
    warned = ' '.join(r.getMessage() for r in caplog.records)
    assert 'epoch_10.pt' in warned and 'epoch_9.pt' in warned and 'resuming from' in warned


def test_unreadable_resume_without_fallback_is_one_line(tmp_path):
    _cut(_save(tmp_path / 'epoch_1.pt', 1))
    explicit = SimpleNamespace(rank_resume_latest=False, resume=str(tmp_path / 'epoch_1.pt'))
    with pytest.raises(SystemExit, match=r'^open_clip_rank: error: checkpoint \S*epoch_1\.pt cannot be read'):
        cf.load_resume_checkpoint(_pt_load, explicit.resume, run_args=explicit)
    latest = SimpleNamespace(rank_resume_latest=True, resume=str(tmp_path / 'epoch_1.pt'))
    with pytest.raises(SystemExit, match='--resume latest found no readable checkpoint') as exit_:
        cf.load_resume_checkpoint(_pt_load, latest.resume, run_args=latest)
    assert '\n' not in str(exit_.value.code)
