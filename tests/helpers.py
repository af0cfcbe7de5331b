"""Shared test helpers: paths, the reference fixtures (tests/fixtures), subprocess environments, in-process CLI
calls, tiny on-disk rank datasets. Tests import them with ``from helpers import ...`` (tests/ is on ``sys.path``
through the ``pythonpath`` setting of the pytest configuration); conftest.py holds only fixtures and hooks."""
import contextlib
import io
import os
import site
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_CONFIG_DIR = Path(__file__).resolve().parent / 'model_configs'
SHARED_DIR = Path(os.environ.get('OPEN_CLIP_RANK_SHARED', REPO_ROOT.parent / 'shared'))
FIXTURES_DIR = Path(__file__).resolve().parent / 'fixtures'  # in the repository (not in the wheel)
SHARED_FIXTURES_DIR = SHARED_DIR / 'fixtures'  # fallback: a shared folder beside the checkout


def fixture_path(name: str) -> Path:
    """tests/fixtures/<name>; else ../shared/fixtures/<name> (or $OPEN_CLIP_RANK_SHARED/fixtures).

    The fixtures are part of the repository: a missing one fails the test (an incomplete checkout), never skips it.
    """
    for folder in (FIXTURES_DIR, SHARED_FIXTURES_DIR):
        path = folder / name
        if path.is_file():
            return path
    pytest.fail(f"reference fixture {name} not found in {FIXTURES_DIR} (part of the repository: is the checkout "
                f"complete?) nor in {SHARED_FIXTURES_DIR}", pytrace=False)


def subprocess_env(**extra):
    """Environment for child interpreters: unbuffered, CPU only, quiet."""
    env = dict(os.environ)
    env.update({'PYTHONUNBUFFERED': '1', 'CUDA_VISIBLE_DEVICES': '', 'OMP_NUM_THREADS': '1'})
    env.update({k: str(v) for k, v in extra.items()})
    return env


# --- child processes ----------------------------------------------------------------------------------

def site_packages():
    return [p for p in site.getsitepackages() if p.endswith('site-packages')]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run(args, env, cwd=None):
    """A child process; the timeout only guards against hangs."""
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def run_gloo_worker(script, out, expected):
    """Run a 2-process gloo worker script (``script OUT PORT``) that saves ``OUT/<name>.pt`` per name in
    ``expected`` and then tears its process group down.

    Every result file is written before the teardown (barrier, destroy_process_group); gloo's teardown can
    rarely abort one process afterwards ("terminate called without an active exception"), which cannot change a
    saved value: that alone is reported as a warning, anything else (a missing result) fails.
    """
    result = run([sys.executable, str(script), str(out), str(free_port())], subprocess_env())
    missing = [name for name in expected if not (Path(out) / f'{name}.pt').is_file()]
    assert not missing, f"missing results {missing}:\n{result.stderr[-3000:]}"
    if result.returncode != 0:
        warnings.warn(f"{Path(script).name}: every result was saved, then the process group teardown failed "
                      f"(exit {result.returncode}): {result.stderr.strip().splitlines()[-1]}")


def call_main(main, argv, cwd=None):
    """A CLI's ``main(argv)`` called in this process, as ``subprocess.run`` would report it.

    For refusals and small conversions: a child interpreter costs ~10 s of imports (torch, OpenCLIP) on the
    CI machines. Exit status from the return value or ``SystemExit``; stdout and stderr captured.
    """
    out, err = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in argv]) or 0
            except SystemExit as exit_:
                code = exit_.code
                if isinstance(code, str):  # sys.exit("message"): the interpreter prints it, status 1
                    print(code, file=sys.stderr)
                    code = 1
                code = code or 0
    finally:
        os.chdir(previous)
    return subprocess.CompletedProcess(list(argv), code, out.getvalue(), err.getvalue())


def run_openclip_main(argv, cwd, launcher=None, in_process=False, timeout=600):
    """``open_clip_train.main`` with ``argv`` in ``cwd`` (OpenCLIP writes ./logs there), the test configs registered.

    A child process (``launcher``: e.g. torchrun's, default ``python -m open_clip_train.main``), or, for refused
    starts (they stop in ``parse_args``, before anything is built), ``main(argv)`` in this process.
    """
    argv = [str(a) for a in argv]
    Path(cwd).mkdir(parents=True, exist_ok=True)
    if in_process:
        from open_clip_train.main import main
        return call_main(main, argv, cwd=cwd)
    launcher = launcher or (sys.executable, '-m', 'open_clip_train.main')
    return subprocess.run([*launcher, *argv], env=subprocess_env(OPEN_CLIP_RANK_MODEL_CONFIGS=str(TEST_CONFIG_DIR)),
                          cwd=str(cwd), capture_output=True, text=True, timeout=timeout)


# --- an installed copy of the project, with only its own .pth processed ----------------------------

def isolated_python(target, code, **env):
    """python -S: no site processing, so only the target's .pth can install the hook.

    The environment's site-packages (torch, open_clip) go on sys.path as plain paths, so their
    .pth files, including an installed open_clip_rank's, are NOT processed.
    """
    bootstrap = (f"import sys, site; sys.path[:0] = [p for p in {site_packages()!r}]; "
                 f"site.addsitedir({str(target)!r}); sys.path.remove({str(target)!r}); "
                 f"sys.path.insert(0, {str(target)!r}); ")
    return run([sys.executable, '-S', '-c', bootstrap + code], subprocess_env(**env), cwd=str(target))


# --- tiny on-disk rank datasets (images drawn with PIL, no downloads) ------------------------------

def write_rank_csv(root, kinds=('circle', 'square'), counts=range(6), per_count=2, size=32, seed=0,
                   name='data.csv', weights=False, sep='\t'):
    """Images with ``count`` shapes of ``kind``; returns the CSV path."""
    rng = np.random.default_rng(seed)
    image_dir = os.path.join(root, 'images')
    os.makedirs(image_dir, exist_ok=True)
    rows = []
    for kind in kinds:
        for count in counts:
            for k in range(per_count):
                image = Image.new('RGB', (size, size), (235, 235, 235))
                draw = ImageDraw.Draw(image)
                for _ in range(count):
                    x, y = rng.integers(0, size - 6, 2)
                    shape = draw.ellipse if kind == 'circle' else draw.rectangle
                    shape([int(x), int(y), int(x) + 5, int(y) + 5], fill=(200, 40, 40))
                path = os.path.join(image_dir, f'{name}_{kind}_{count}_{k}.png')
                image.save(path)
                rows.append([path, f'Rank the numbers of {kind}.', kind, str(count)])
    header = ['filepath', 'title', 'cname', 'value']
    if weights:
        header.append('sample_weights_by_class')
        for row in rows:
            row.append(str(1.0 + float(row[3])))
    path = os.path.join(root, name)
    with open(path, 'w') as f:
        f.write(sep.join(header) + '\n')
        for row in rows:
            f.write(sep.join(row) + '\n')
    return path


def make_unreadable_image(path) -> str:
    """A file named like an image that PIL cannot open, to test that loaders skip bad images."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'wb') as f:
        f.write(b'\x00this is not an image\xff' * 16)
    return path


# --- damaged checkpoints ---------------------------------------------------------------------------------

def zip_records(path):
    """A torch zip checkpoint's records: name -> (offset of the record's data in the file, its length)."""
    import struct
    import zipfile
    data = Path(path).read_bytes()
    out = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            name_len, extra_len = struct.unpack('<HH', data[info.header_offset + 26:info.header_offset + 30])
            out[info.filename] = (info.header_offset + 30 + name_len + extra_len, info.file_size)
    return out


def flip_bit_in_tensor_data(path, fraction=1 / 3):
    """Flip one bit inside the largest tensor of a torch zip checkpoint (torch.load does not notice)."""
    records = zip_records(path)
    start, length = max((v for k, v in records.items() if '/data/' in k), key=lambda v: v[1])
    data = bytearray(Path(path).read_bytes())
    data[start + int(length * fraction)] ^= 0x10
    Path(path).write_bytes(bytes(data))
    return path
