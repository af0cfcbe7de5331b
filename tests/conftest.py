"""Shared test helpers: tiny model configs, the ../shared fixtures, subprocess environments."""
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_CONFIG_DIR = Path(__file__).resolve().parent / 'model_configs'
SHARED_DIR = Path(os.environ.get('OPEN_CLIP_RANK_SHARED', REPO_ROOT.parent / 'shared'))
FIXTURES_DIR = SHARED_DIR / 'fixtures'


def pytest_configure(config):
    import open_clip
    import open_clip_rank  # noqa: F401  (registers explicitly where the .pth is not processed)
    open_clip.add_model_config(TEST_CONFIG_DIR)


def fixture_path(name: str) -> Path:
    path = FIXTURES_DIR / name
    if not path.is_file():
        pytest.skip(f"reference fixture {path} not found: the tests need ../shared/fixtures beside the checkout "
                    f"(or OPEN_CLIP_RANK_SHARED pointing at the shared folder)")
    return path


def subprocess_env(**extra):
    """Environment for child interpreters: unbuffered, CPU only, quiet."""
    env = dict(os.environ)
    env.update({'PYTHONUNBUFFERED': '1', 'CUDA_VISIBLE_DEVICES': '', 'OMP_NUM_THREADS': '1'})
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture
def python():
    return sys.executable
