"""The README's main command: the demo trains a model that ranks held-out images (SRCC >= 0.8)."""
import json
import subprocess
import sys

import pytest

from helpers import subprocess_env

pytestmark = pytest.mark.e2e


def test_demo_learns_to_rank_held_out_images(tmp_path):
    out = tmp_path / 'demo'
    result = subprocess.run([sys.executable, '-m', 'open_clip_rank.demo', '--out', str(out)],
                            env=subprocess_env(OMP_NUM_THREADS=2), capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    metrics = json.loads((out / 'val_metrics.json').read_text())
    assert metrics['srcc'] >= 0.8, metrics
    assert metrics['num_samples'] == 3 * 10 * 6
    for kind in ('circle', 'square', 'triangle'):
        assert metrics[f'{kind}/srcc'] >= 0.6, metrics  # each instruction is followed, not just one
    assert 'PASS' in result.stdout
    assert (out / 'logs' / 'demo' / 'checkpoints' / 'epoch_4.pt').is_file()
    assert (out / 'val_contact_sheet.png').is_file()
    epochs = [json.loads(line) for line in (out / 'logs' / 'demo' / 'checkpoints' / 'results.jsonl').read_text().splitlines()]
    assert [e['epoch'] for e in epochs] == [1, 2, 3, 4]
