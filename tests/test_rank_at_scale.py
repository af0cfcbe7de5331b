"""Scoring at scale through the rank CLI: webdataset shards, DataLoader workers, Parquet partitions that resume,
damaged samples listed, and a torchrun launch that splits the work exactly (open_clip_rank/scoring/)."""
import io
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import open_clip
from open_clip_rank.scoring import outputs
from open_clip_rank.scoring.partitions import chunk_partitions, for_process, shard_name, shard_partitions
from helpers import TEST_CONFIG_DIR, call_main, free_port, subprocess_env

MODEL = 'tiny-vit-adapter'
PROMPT = 'Rank the numbers of circle.'


def _png(seed):
    buffer = io.BytesIO()
    Image.effect_noise((32, 32), 10 + 7 * seed).convert('RGB').save(buffer, 'PNG')
    return buffer.getvalue()


def _write_shard(path, keys, damaged=()):
    import webdataset as wds
    with wds.TarWriter(str(path)) as writer:
        for i, key in enumerate(keys):
            sample = {'__key__': key, 'png': _png(hash(key) % 50),
                      'json': json.dumps({'uid': f'{i:032x}', 'title': PROMPT}).encode()}
            if key in damaged:
                sample['png' if damaged[key] == 'image' else 'json'] = b'not an image' if damaged[key] == 'image' \
                    else b'{"uid": '
            writer.write(sample)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('scale')
    torch.manual_seed(7)
    model = open_clip.create_model(MODEL)
    checkpoint = root / 'epoch_1.pt'
    torch.save({'epoch': 1, 'state_dict': model.state_dict()}, checkpoint)
    shards = []
    for s in range(4):
        path = root / f'part-{s:03d}.tar'
        _write_shard(path, [f's{s}_{i:02d}' for i in range(5)])
        shards.append(path)
    return {'root': root, 'checkpoint': checkpoint, 'shards': shards,
            'url': str(root / 'part-{000..003}.tar')}


def _rank(*argv, cwd=None):
    from open_clip_rank.rank import main
    return call_main(main, ['--model', MODEL, '--device', 'cpu', '--no-progress', *argv], cwd=cwd)


def _scores(folder):
    rows = outputs.read_scores(folder).to_pylist()
    return {(r['key'], r['prompt']): r['score'] for r in rows}, [r['key'] for r in rows]


@pytest.mark.unit
def test_partitions_split_disjoint_and_complete():
    items = [{'key': str(i), 'path': str(i)} for i in range(23)]
    parts = chunk_partitions(items, 'folder', 'files', 5)
    assert [len(p.items) for p in parts] == [5, 5, 5, 5, 3]
    for world in (1, 2, 3, 7):
        shares = [for_process(parts, r, world) for r in range(world)]
        names = [p.name for share in shares for p in share]
        assert sorted(names) == sorted(p.name for p in parts) and len(set(names)) == len(names)
    names = [p.name for p in shard_partitions(['a/x.tar', 'b/x.tar', 'pipe:curl -s http://h/y.tar'])]
    assert len(set(names)) == 3 and names[0].startswith('shard-x-') and names[1].startswith('shard-x-')


@pytest.mark.unit
def test_shards_with_workers_equal_in_process_scoring(setup, tmp_path):
    results = {}
    for workers in (0, 2):
        out = tmp_path / f'w{workers}'
        done = _rank('--checkpoint-path', setup['checkpoint'], '--shards', setup['url'], '--prompt', PROMPT,
                     '--prompt', 'Rank the age.', '--output-dir', out, '--workers', workers, '--batch-size', 3,
                     '--shard-keep-keys', 'uid')
        assert done.returncode == 0, done.stderr[-3000:]
        results[workers], keys = _scores(out)
        assert len(keys) == 40 and len(set(results[workers])) == 40  # 20 images x 2 prompts, each once
    assert results[0].keys() == results[2].keys()
    torch.testing.assert_close(torch.tensor([results[2][k] for k in results[0]]),
                               torch.tensor(list(results[0].values())))
    table = outputs.read_scores(tmp_path / 'w0')
    assert {'key', 'prompt', 'score', 'url', 'uid'} <= set(table.column_names)
    meta = outputs.partition_metadata(outputs.partition_path(tmp_path / 'w0', shard_name(str(setup['shards'][0]))))
    assert meta['model'] == MODEL and meta['checkpoint_sha256'] and meta['num_rows'] == 10
    manifest = outputs.read_manifest(tmp_path / 'w0')
    assert len(manifest['partitions']) == 4 and manifest['checkpoint'].endswith('epoch_1.pt')


@pytest.mark.unit
def test_damaged_samples_are_listed_and_an_unreachable_shard_refused(setup, tmp_path, caplog):
    shard = tmp_path / 'damaged.tar'
    _write_shard(shard, ['a', 'b', 'c', 'd'], damaged={'b': 'image', 'c': 'json'})
    out = tmp_path / 'out'
    done = _rank('--checkpoint-path', setup['checkpoint'], '--shards', shard, '--output-dir', out,
                 '--shard-prompt-key', 'title')  # each sample's own instruction, from its json
    assert done.returncode == 0, done.stderr[-3000:]
    scores, keys = _scores(out)
    assert sorted(keys) == ['a', 'd'] and {p for _, p in scores} == {PROMPT}
    skipped = {s['key']: s['reason'] for s in outputs.skipped_samples(out)}
    assert set(skipped) == {'b', 'c'} and 'cannot identify image file' in skipped['b']
    assert 'JSONDecodeError' in skipped['c']
    assert '2 sample(s) skipped' in caplog.text
    missing = _rank('--checkpoint-path', setup['checkpoint'], '--shards', str(tmp_path / 'nope-{0..1}.tar'),
                    '--prompt', PROMPT, '--output-dir', tmp_path / 'out2')
    assert missing.returncode == 2 and not (tmp_path / 'out2' / 'scores').exists()
    assert missing.stderr.strip().splitlines()[-1].startswith('open_clip_rank.rank: error: 2 shard(s) of --shards')


@pytest.mark.unit
def test_a_killed_run_resumes_without_duplicates_and_refuses_another_model(setup, tmp_path, monkeypatch, caplog):
    from open_clip_rank.scoring import engine
    caplog.set_level(logging.INFO)
    out = tmp_path / 'out'
    argv = ['--checkpoint-path', setup['checkpoint'], '--shards', setup['url'], '--prompt', PROMPT,
            '--output-dir', out, '--batch-size', 4]
    written = []
    original = outputs.write_partition

    def killed_after_two(folder, name, *args, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt  # SIGINT mid-run, after two partitions are on disk
        written.append(name)
        return original(folder, name, *args, **kwargs)

    monkeypatch.setattr(engine.outputs, 'write_partition', killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        _rank(*argv)
    monkeypatch.setattr(engine.outputs, 'write_partition', original)
    first = {name: os.stat(outputs.partition_path(out, name)).st_mtime_ns for name in written}
    assert len(outputs.completed_partitions(out)) == 2
    stale = out / 'scores' / '.shard-part-002-0123456789.parquet.tmp-99999'  # what a SIGKILL mid-write leaves
    stale.write_bytes(b'PAR1 half a file')
    again = _rank(*argv)
    assert again.returncode == 0, again.stderr[-3000:]
    assert '2 partition(s) already scored' in caplog.text
    _, keys = _scores(out)
    assert sorted(keys) == sorted(f's{s}_{i:02d}' for s in range(4) for i in range(5))  # every key exactly once
    assert not stale.exists()
    for name, mtime in first.items():  # the finished partitions were not redone
        assert os.stat(outputs.partition_path(out, name)).st_mtime_ns == mtime
    other = _rank('--checkpoint-path', setup['checkpoint'], '--shards', setup['url'], '--prompt', 'Rank the age.',
                  '--output-dir', out)
    assert other.returncode == 2
    assert 'holds scores of another run (prompts' in other.stderr and 'new --output-dir' in other.stderr
    (out / 'manifest.json').unlink()  # the score files themselves say what produced them
    assert _rank('--checkpoint-path', setup['checkpoint'], '--shards', setup['url'], '--prompt', 'Rank the age.',
                 '--output-dir', out).returncode == 2


@pytest.mark.e2e
def test_two_processes_give_exactly_the_scores_of_one(setup, tmp_path):
    one = _rank('--checkpoint-path', setup['checkpoint'], '--shards', setup['url'], '--prompt', PROMPT,
                '--output-dir', tmp_path / 'one')
    assert one.returncode == 0, one.stderr[-3000:]
    env = subprocess_env(OPEN_CLIP_RANK_MODEL_CONFIGS=str(TEST_CONFIG_DIR))
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc-per-node', '2',
                             '--master-port', str(free_port()), '-m', 'open_clip_rank.rank', '--model', MODEL,
                             '--device', 'cpu', '--no-progress', '--checkpoint-path', str(setup['checkpoint']),
                             '--shards', setup['url'], '--prompt', PROMPT, '--output-dir', str(tmp_path / 'two')],
                            env=env, capture_output=True, text=True, timeout=600)
    single, _ = _scores(tmp_path / 'one')
    double, keys = _scores(tmp_path / 'two')
    assert len(keys) == len(set(keys)) == 20, result.stderr[-3000:]
    assert single.keys() == double.keys()
    torch.testing.assert_close(torch.tensor([double[k] for k in single]), torch.tensor(list(single.values())))
    assert 'process 1/2' in result.stderr and 'process 0/2' in result.stderr


@pytest.mark.unit
def test_ground_truth_in_shards_gives_the_metrics_of_the_small_path(setup, tmp_path):
    """Shards carrying title / cname / value (as make_shards writes them): metrics.json from the written files
    equals the metrics of the same rows ranked as a CSV through today's outputs."""
    import webdataset as wds
    rows = [(f'k{i:02d}', 'circle' if i % 2 else 'square', float(i % 7)) for i in range(16)]
    images, csv_lines = tmp_path / 'images', ['filepath\ttitle\tcname\tvalue']
    images.mkdir()
    with wds.TarWriter(str(tmp_path / 'truth.tar')) as writer:
        for key, cname, value in rows:
            png = _png(int(value) + 3 * (cname == 'circle'))
            (images / f'{key}.png').write_bytes(png)
            caption = f'Rank the numbers of {cname}.'
            csv_lines.append(f'{images / key}.png\t{caption}\t{cname}\t{value}')
            writer.write({'__key__': key, 'png': png,
                          'json': json.dumps({'title': caption, 'cname': cname, 'value': value}).encode()})
    (tmp_path / 'truth.csv').write_text('\n'.join(csv_lines) + '\n')
    out = tmp_path / 'out'
    done = _rank('--checkpoint-path', setup['checkpoint'], '--shards', tmp_path / 'truth.tar', '--output-dir', out,
                 '--shard-prompt-key', 'title', '--shard-target-key', 'value', '--shard-category-key', 'cname')
    assert done.returncode == 0, done.stderr[-3000:]
    small = _rank('--checkpoint-path', setup['checkpoint'], '--csv', tmp_path / 'truth.csv',
                  '--output-path', tmp_path / 'small')
    assert small.returncode == 0, small.stderr[-3000:]
    from_folder = json.loads((out / 'metrics.json').read_text())['metrics']
    from_csv = json.loads((tmp_path / 'small.json').read_text())['metrics']
    assert from_folder.keys() == from_csv.keys() and 'srcc' in json.dumps(from_folder)
    assert json.dumps(from_folder, sort_keys=True) == json.dumps(from_csv, sort_keys=True)


@pytest.mark.unit
def test_learned_prompt_models_write_every_prediction(tmp_path):
    images = tmp_path / 'images'
    images.mkdir()
    for i in range(5):
        (images / f'{i}.png').write_bytes(_png(i))
    out = tmp_path / 'out'
    from open_clip_rank.rank import main
    done = call_main(main,
                     ['--model', 'tiny-rn-ordinal', '--random-weights', '--device', 'cpu', '--no-progress', '--images',
                      images, '--output-dir', out, '--probabilities', '--partition-size', 2])
    assert done.returncode == 0, done.stderr[-3000:]
    table = outputs.read_scores(out)
    assert len(outputs.completed_partitions(out)) == 3 and table.num_rows == 5
    assert {'score', 'expected_rank', 'predicted_rank', 'probs', 'path'} <= set(table.column_names)
    probs = torch.tensor(table['probs'].to_pylist())
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(5))
    assert set(table['prompt'].to_pylist()) == {''}


@pytest.mark.unit
def test_a_folder_rerun_must_chunk_the_same_files_and_keep_keys_cannot_shadow_columns(setup, tmp_path):
    images = tmp_path / 'images'
    images.mkdir()
    for i in range(5):
        (images / f'{i}.png').write_bytes(_png(i))
    out = tmp_path / 'out'
    argv = ['--checkpoint-path', setup['checkpoint'], '--images', images, '--prompt', PROMPT, '--output-dir', out]
    assert _rank(*argv, '--partition-size', 2).returncode == 0
    changed = _rank(*argv, '--partition-size', 3)  # other chunks under the same names: never mixed
    assert changed.returncode == 2 and 'holds scores of another run (chunks' in changed.stderr
    (images / '5.png').write_bytes(_png(5))  # a new file shifts the chunks too
    assert _rank(*argv, '--partition-size', 2).returncode == 2
    shadow = _rank('--checkpoint-path', setup['checkpoint'], '--shards', setup['url'], '--prompt', PROMPT,
                   '--output-dir', tmp_path / 'o2', '--shard-keep-keys', 'uid', 'url')
    assert shadow.returncode == 2 and '--shard-keep-keys url: the score files already have a column' in shadow.stderr


@pytest.mark.e2e
def test_a_sigkilled_run_resumes_with_every_key_once(setup, tmp_path):
    """A real process killed with SIGKILL after its first partition: the rerun redoes only the rest."""
    import signal
    import time
    out = tmp_path / 'out'
    cmd = [sys.executable, '-m', 'open_clip_rank.rank', '--model', MODEL, '--device', 'cpu', '--no-progress',
           '--checkpoint-path', str(setup['checkpoint']), '--shards', setup['url'], '--prompt', PROMPT,
           '--output-dir', str(out), '--batch-size', '1', '--workers', '0']
    env = subprocess_env(OPEN_CLIP_RANK_MODEL_CONFIGS=str(TEST_CONFIG_DIR))
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600  # a hang guard only
    while process.poll() is None and time.monotonic() < deadline and not outputs.completed_partitions(out):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=600)
    first = {name: os.stat(path).st_mtime_ns for name, path in outputs.completed_partitions(out).items()}
    assert 1 <= len(first) <= 4
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    _, keys = _scores(out)
    assert sorted(keys) == sorted(f's{s}_{i:02d}' for s in range(4) for i in range(5))  # every key exactly once
    for name, mtime in first.items():
        assert os.stat(outputs.partition_path(out, name)).st_mtime_ns == mtime  # finished partitions kept
    assert not [p for p in (out / 'scores').iterdir() if p.name.startswith('.')]  # no temporary left
