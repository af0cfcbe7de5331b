"""Pytest fixtures and hooks. The shared helper functions and constants are in helpers.py (``from helpers import``)."""
import sys

import pytest

from helpers import REPO_ROOT, TEST_CONFIG_DIR, run, subprocess_env

KIND_MARKERS = ('unit', 'e2e')  # every test carries exactly one (see the markers in pyproject.toml's [tool.pytest.ini_options])


def pytest_configure(config):
    import open_clip
    import open_clip_rank  # noqa: F401  (registers explicitly where the .pth is not processed)
    open_clip.add_model_config(TEST_CONFIG_DIR)


@pytest.hookimpl(tryfirst=True)  # before -m deselects: every collected test is checked
def pytest_collection_modifyitems(config, items):
    """Refuse to run a test that carries neither ``unit`` nor ``e2e`` (or both), or ``distributed`` without
    ``e2e``: the fast run (``pytest -m unit``) must not lose a test, nor gain a slow one, silently."""
    wrong = []
    for item in items:
        kinds = [m for m in KIND_MARKERS if item.get_closest_marker(m) is not None]
        if len(kinds) != 1:
            wrong.append(f"{item.nodeid}: marked {kinds or 'with neither'}")
        elif item.get_closest_marker('distributed') is not None and kinds != ['e2e']:
            wrong.append(f"{item.nodeid}: 'distributed' without 'e2e'")
    if wrong:
        raise pytest.UsageError(
            "every test needs exactly one of the markers 'unit' (fast, in-process, no training run) or 'e2e' "
            "(training runs, CLIs in child processes; 2-process runs add 'distributed'); mark the module "
            "(pytestmark = pytest.mark.unit) or the test:\n  " + "\n  ".join(wrong))


@pytest.fixture
def python():
    return sys.executable


@pytest.fixture(scope='session')
def target_install(tmp_path_factory):
    """``pip install --target DIR .``: a regular (wheel) install into an empty directory."""
    target = tmp_path_factory.mktemp('target')
    result = run([sys.executable, '-m', 'pip', 'install', '--quiet', '--no-deps', '--no-build-isolation',
                  '--target', str(target), str(REPO_ROOT)], subprocess_env())
    assert result.returncode == 0, result.stderr
    assert (target / 'open_clip_rank-autoload.pth').is_file()
    assert (target / 'open_clip_rank' / 'model_configs' / 'RN50-adapter.json').is_file()
    return target
