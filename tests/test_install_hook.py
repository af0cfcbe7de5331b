"""The autoload hook: a fresh install makes OpenCLIP know the plugin without importing it."""
import shutil
import sys
from pathlib import Path

import pytest

from helpers import REPO_ROOT, isolated_python as _isolated_python, run as _run, site_packages as _site_packages, \
    subprocess_env

pytestmark = pytest.mark.e2e


def test_pth_autoload_registers_on_open_clip_import(target_install):
    code = ("import sys; assert 'torch' not in sys.modules, 'the .pth must not import torch'; "
            "import open_clip; assert open_clip.__file__; "
            "assert sys.modules['open_clip_rank'].__file__.startswith(" + repr(str(target_install)) + "); "
            "print('RN50-adapter' in open_clip.list_models(), type(open_clip.create_model('RN50-adapter', "
            "device='meta')).__name__)")
    result = _isolated_python(target_install, code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ['True', 'RankAdapterCLIP']


def test_wheel_leaves_out_the_test_fixtures_and_docs(target_install):
    """The reference fixtures (about 25 MB) and the design notes live in the repository, not in the wheel."""
    installed = [p.relative_to(target_install).as_posix() for p in target_install.rglob('*') if p.is_file()]
    assert not [p for p in installed if p.endswith('.pt') or 'fixtures' in p or 'DESIGN' in p]
    assert 'open_clip_rank/integration/start_checks.py' in installed and 'open_clip_rank/files/checkpoints.py' in installed


def test_autoload_can_be_disabled_and_explicit_import_still_registers(target_install):
    code = ("import sys, open_clip; print('open_clip_rank' in sys.modules, 'RN50-adapter' in open_clip.list_models()); "
            "import open_clip_rank; print('RN50-adapter' in open_clip.list_models())")
    result = _isolated_python(target_install, code, OPEN_CLIP_RANK_AUTOLOAD='0')
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ['False', 'False', 'True']


def test_training_cli_help_shows_plugin_section(target_install):
    code = "import runpy, sys; sys.argv = ['main', '--help']; runpy.run_module('open_clip_train.main', run_name='__main__')"
    result = _isolated_python(target_install, code)
    assert result.returncode == 0, result.stderr
    assert '--dataset-type' in result.stdout  # OpenCLIP's own flags
    assert 'open_clip_rank:' in result.stdout  # our section


def test_plugin_train_module_help(python):
    result = _run([python, '-m', 'open_clip_rank.train', '--help'], subprocess_env(OPEN_CLIP_RANK_AUTOLOAD='0'))
    assert result.returncode == 0, result.stderr
    assert '--dataset-type' in result.stdout and 'open_clip_rank:' in result.stdout


def test_legacy_training_package_of_a_source_checkout_is_hooked(target_install, tmp_path):
    """OpenCLIP source checkouts import ``training.*`` (src/training beside src/open_clip)."""
    import open_clip
    import open_clip_train
    src = tmp_path / 'src'
    src.mkdir()
    shutil.copytree(Path(open_clip.__file__).parent, src / 'open_clip')
    shutil.copytree(Path(open_clip_train.__file__).parent, src / 'training')
    code = (f"import sys; sys.path.insert(0, {str(src)!r}); import training.params as p; "
            "print(getattr(p.parse_args, '_open_clip_rank', False)); import open_clip; "
            "print(open_clip.__file__.startswith(" + repr(str(src)) + "), 'RN50-adapter' in open_clip.list_models())")
    result = _isolated_python(target_install, code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ['True', 'True', 'True']


def test_unrelated_training_package_is_left_alone(target_install, tmp_path):
    (tmp_path / 'training').mkdir()
    (tmp_path / 'training' / '__init__.py').write_text('')
    code = f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import training; print('open_clip' in sys.modules)"
    result = _isolated_python(target_install, code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ['False']


def test_editable_install_gets_the_pth(tmp_path):
    """``pip install -e .`` (PEP 660) in a new virtual environment also carries the autoload .pth."""
    venv = tmp_path / 'venv'
    assert _run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], subprocess_env()).returncode == 0
    inner_python = venv / 'bin' / 'python'
    inner_site = Path(_run([str(inner_python), '-c', 'import site; print(site.getsitepackages()[0])'],
                           subprocess_env()).stdout.strip())
    # the outer environment's packages as a plain path entry: visible, but its .pth files are not processed
    (inner_site / '_outer.pth').write_text('\n'.join(_site_packages()) + '\n')
    result = _run([str(inner_python), '-m', 'pip', 'install', '--quiet', '--no-deps', '--no-build-isolation',
                   '--no-index', '-e', str(REPO_ROOT)], subprocess_env(), cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert (inner_site / 'open_clip_rank-autoload.pth').is_file()
    code = ("import sys, open_clip; print(sys.modules['open_clip_rank'].__file__); "
            "print('RN50-adapter' in open_clip.list_models())")
    result = _run([str(inner_python), '-c', code], subprocess_env(), cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    origin, listed = result.stdout.split()
    assert origin.startswith(str(REPO_ROOT)) and listed == 'True'
    # the design card's command: the original fork's ``training.main`` runs OpenCLIP's trainer with the plugin
    result = _run([str(inner_python), '-m', 'training.main', '--help'], subprocess_env(), cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert '--loss-opt' in result.stdout and '--dataset-type' in result.stdout
