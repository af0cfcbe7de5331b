"""An interrupted or refused run never leaves the user stuck.

* SIGINT during a checkpoint write, then ``--resume latest``: continues from the newest intact checkpoint (one
  with a flipped bit is skipped: every checkpoint carries a checksum);
* a refused start (bad CSV, bad flag, unknown model, existing experiment) exits non-zero before OpenCLIP
  creates ``logs/<name>``;
* the run's last lines are its own, not torch's internal loggers'.
"""
import configparser
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import REPO_ROOT, TEST_CONFIG_DIR, flip_bit_in_tensor_data, subprocess_env, write_rank_csv


@pytest.fixture(scope='module')
def train_csv(tmp_path_factory):
    return write_rank_csv(str(tmp_path_factory.mktemp('interrupted')), per_count=2, name='train.csv')


def _command(train_csv, logs, name, *extra):
    return [sys.executable, '-m', 'open_clip_train.main', '--model', 'tiny-vit-adapter', '--dataset-type', 'csv',
            '--csv-dataset-sample-type', 'rank', '--train-data', train_csv, '--batch-size', '8', '--lr', '1e-3',
            '--warmup', '1', '--workers', '0', '--seed', '0', '--logs', str(logs), '--name', name,
            '--save-frequency', '1', *extra]


def _env():
    return subprocess_env(OPEN_CLIP_RANK_MODEL_CONFIGS=TEST_CONFIG_DIR)


def _interrupt_during_epoch_2_save(cmd, checkpoints: Path):
    """Start the run and send SIGINT as soon as epoch 2's checkpoint (or its temporary file) appears."""
    process = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600  # a hang guard only
    try:
        while process.poll() is None and time.monotonic() < deadline:
            if checkpoints.is_dir() and any(p.name.startswith(('epoch_2', '.epoch_2')) for p in checkpoints.iterdir()):
                process.send_signal(signal.SIGINT)
                break
            time.sleep(0.002)
        output, _ = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
    return output


@pytest.mark.e2e
def test_sigint_mid_checkpoint_write_then_resume_latest(train_csv, tmp_path):
    logs = tmp_path / 'logs'
    checkpoints = logs / 'run' / 'checkpoints'
    cmd = _command(train_csv, logs, 'run', '--epochs', '3')
    output = _interrupt_during_epoch_2_save(cmd, checkpoints)
    assert (checkpoints / 'epoch_1.pt').is_file(), output[-3000:]
    # writes are atomic: every checkpoint present is complete (readable), and no temporary file is left
    # under a checkpoint name (OpenCLIP's own in-place write would leave a truncated epoch_2.pt here)
    from open_clip_rank.files.checkpoints import unreadable_reason
    from open_clip_rank.files.integrity import CHECKSUM_KEY
    assert {p.name for p in checkpoints.glob('*.pt')} <= {'epoch_1.pt', 'epoch_2.pt', 'epoch_3.pt'}
    for written in checkpoints.glob('*.pt'):
        assert unreadable_reason(str(written)) is None, written
        assert CHECKSUM_KEY in torch.load(written, map_location='cpu', weights_only=True)  # every loader verifies it
    assert not [p.name for p in checkpoints.iterdir() if '.tmp-' in p.name]  # removed on KeyboardInterrupt
    for late in checkpoints.glob('epoch_3.pt'):  # the signal came after the write: drop what followed it
        late.unlink()
    # Damage torch.load does not notice: one flipped bit in the tensor data of epoch_2.pt (the checksum does).
    source = checkpoints / ('epoch_2.pt' if (checkpoints / 'epoch_2.pt').is_file() else 'epoch_1.pt')
    (checkpoints / 'epoch_2.pt').write_bytes(source.read_bytes())
    flip_bit_in_tensor_data(checkpoints / 'epoch_2.pt')

    resumed = subprocess.run([*cmd, '--resume', 'latest', '--report-to', 'tensorboard'], env=_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (logs / 'run' / 'out.log').read_text()
    assert re.search(r'WARNING \| --resume latest: skipping damaged checkpoint \S*epoch_2\.pt', log)
    assert re.search(r"=> resuming checkpoint '\S*epoch_1\.pt' \(epoch 1\)", log)
    resumed_part = log[log.index('skipping damaged checkpoint'):]
    assert 'Start epoch 1' in resumed_part and 'Start epoch 0' not in resumed_part
    for epoch in (2, 3):  # rewritten complete
        assert torch.load(checkpoints / f'epoch_{epoch}.pt', map_location='cpu')['epoch'] == epoch
    assert any((logs / 'run' / 'tensorboard').iterdir())  # --report-to tensorboard works after the README install
    # the run ends with its own lines, not torch's internal loggers' exit reports
    tail = resumed.stderr.strip().splitlines()[-3:]
    assert not any('TorchDynamo' in line or 'FakeTensor' in line or line.startswith('I1') for line in tail), tail
    assert 'TorchDynamo' not in resumed.stderr


REFUSALS = {
    'missing column': (['--epochs', '1', '--csv-value-key', 'score'], "no column 'score'"),
    'unknown model': (['--epochs', '1', '--model', 'tiny-vit-adaptr'],
                      "unknown model 'tiny-vit-adaptr' (closest: tiny-vit-adapter"),
    'pretrained missing': (['--epochs', '1', '--pretrained', 'nope.pt'], '--pretrained nope.pt is neither a file'),
    'unreadable resume': (['--epochs', '1', '--resume', '{cut}'], 'cannot be read'),
    'flipped pretrained': (['--epochs', '1', '--pretrained', '{flipped}'], 'flipped.pt cannot be read (sha256 checksum'),
    'flipped resume': (['--epochs', '1', '--resume', '{flipped}'], 'flipped.pt cannot be read (sha256 checksum'),
    'pretrained for another config': (['--epochs', '1', '--pretrained', '{wide}'], 'wide.pt does not fit this model'),
    'resume for another config': (['--epochs', '1', '--resume', '{wide_run}'], 'wide_run.pt does not fit'),
    'batch larger than the data': (['--epochs', '1', '--batch-size', '64'], 'fewer than one batch'),
}


@pytest.mark.e2e
def test_refused_starts_exit_nonzero_and_leave_no_experiment(train_csv, tmp_path, monkeypatch, capsys):
    """In-process through OpenCLIP's main (each refusal happens in its parse_args), plus one real process."""
    import open_clip_train.main
    import open_clip
    from open_clip_rank.files.integrity import add_checksum
    files = {'cut': tmp_path / 'cut.pt', 'flipped': tmp_path / 'flipped.pt', 'wide': tmp_path / 'wide.pt',
             'wide_run': tmp_path / 'wide_run.pt'}
    files['cut'].write_bytes(b'PK\x03\x04' + b'\x00' * 64)  # a zip that stops after its first header
    torch.save(add_checksum({'epoch': 1, 'state_dict': open_clip.create_model('tiny-vit-adapter').state_dict()}),
               files['flipped'])
    flip_bit_in_tensor_data(files['flipped'])
    wide = open_clip.create_model('tiny-vit-w64').state_dict()  # base weights of another width
    torch.save(wide, files['wide'])
    torch.save({'epoch': 2, 'state_dict': {f'module.{k}': v for k, v in wide.items()}}, files['wide_run'])
    logs = tmp_path / 'logs'
    for case, (extra, expected) in REFUSALS.items():
        for key, path in files.items():
            extra = [e.replace('{%s}' % key, str(path)) for e in extra]
        cmd = _command(train_csv, logs, case.replace(' ', '_'), *extra)
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            open_clip_train.main.main(cmd[3:])
        assert exit_.value.code == 2, case
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith('open_clip_rank: error:') and expected in error, (case, error)
        assert not (logs / case.replace(' ', '_')).exists(), case
    # A real process: the one-line refusal is the last line, exit status 2, and the rerun after the fix is
    # not blocked by "Experiment already exists".
    refused = subprocess.run(_command(train_csv, logs, 'again', '--epochs', '1', '--csv-value-key', 'score'),
                             env=_env(), capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith('open_clip_rank: error:') and "no column 'score'" in last and '--csv-value-key' in last
    assert not (logs / 'again').exists()
    # an experiment that exists: OpenCLIP's own refusal, but non-zero and before anything else
    (logs / 'again').mkdir(parents=True)
    (logs / 'again' / 'out.log').write_text('an earlier run\n')
    with pytest.raises(SystemExit) as exit_:
        open_clip_train.main.main(_command(train_csv, logs, 'again', '--epochs', '1')[3:])
    assert exit_.value.code == 2
    assert sorted(os.listdir(logs / 'again')) == ['out.log']


@pytest.mark.unit
def test_readme_install_brings_tensorboard():
    """The README advertises tensorboard; its install command (the same line as .ci/run) installs it."""
    readme = (REPO_ROOT / 'README.md').read_text()
    ci = (REPO_ROOT / '.ci' / 'run').read_text()
    install = re.search(r'^pip install torch\S* torchvision\S* -e (\S+)', readme, re.M)
    assert install and install.group(0) in ci
    extras = re.fullmatch(r"'\.\[([\w,]+)\]'", install.group(1)).group(1).split(',')
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / 'setup.cfg')
    required = [line.strip() for extra in extras for line in config['options.extras_require'][extra].splitlines()]
    assert 'tensorboard' in required and 'tensorboard' in readme
