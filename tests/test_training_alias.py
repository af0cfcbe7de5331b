"""``training`` (the original fork's source-checkout name) is an alias of the installed ``open_clip_train``."""
import sys

import pytest

from helpers import TEST_CONFIG_DIR, free_port, isolated_python as _isolated_python, run as _run, subprocess_env, \
    write_rank_csv

pytestmark = pytest.mark.e2e


def test_alias_modules_are_the_real_ones(target_install):
    code = ("import sys, training, training.params, open_clip_train, open_clip_train.params; "
            "print(training is open_clip_train, training.params is open_clip_train.params "
            "is sys.modules['training.params'], "
            "open_clip_train.params.__spec__.name, open_clip_train.params.__name__, "
            "getattr(training.params.parse_args, '_open_clip_rank', False))")
    result = _isolated_python(target_install, code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ['True', 'True', 'open_clip_train.params', 'open_clip_train.params', 'True']


def test_alias_import_first_loads_plugins_and_makes_no_copies(target_install):
    """``training`` imported before anything else: plugins load, no module is executed twice."""
    code = ("import sys, training.data, training.main; import open_clip; "
            "copies = [n for n, m in sys.modules.items() if n.startswith('training') "
            "and m is not sys.modules['open_clip_train' + n[len('training'):]]]; "
            "print(copies, 'RN50-adapter' in open_clip.list_models(), "
            "getattr(training.data.get_data, '_open_clip_rank', False))")
    result = _isolated_python(target_install, code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ['[]', 'True', 'True']


def test_post_import_callback_gets_the_module_in_sys_modules(target_install):
    """The alias loader swaps the real module in: callbacks for ``training.x`` receive that one."""
    code = ("import sys; from open_clip_rank.integration import _bootstrap; got = []; "
            "_bootstrap.when_imported('training.logger', got.append); import training.logger; "
            "print(len(got), got[0] is sys.modules['open_clip_train.logger'] is training.logger)")
    result = _isolated_python(target_install, code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ['1', 'True']


def test_python_m_training_main_runs_the_openclip_trainer(target_install):
    code = ("import runpy, sys; sys.argv = ['main', '--help']; "
            "runpy.run_module('training.main', run_name='__main__', alter_sys=True)")
    result = _isolated_python(target_install, code)
    assert result.returncode == 0, result.stderr
    assert '--loss-opt' in result.stdout and '--dataset-type' in result.stdout


def test_no_alias_when_autoload_is_off(target_install):
    code = "import importlib.util; print(importlib.util.find_spec('training')); import training"
    result = _isolated_python(target_install, code, OPEN_CLIP_RANK_AUTOLOAD='0')
    assert result.stdout.split() == ['None']
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "ModuleNotFoundError: No module named 'training'"


def test_a_real_training_package_wins(target_install, tmp_path):
    (tmp_path / 'training').mkdir()
    (tmp_path / 'training' / '__init__.py').write_text('')
    (tmp_path / 'training' / 'main.py').write_text("print('USER-TRAINING-MAIN')\n")
    code = (f"import runpy, sys; sys.path.insert(0, {str(tmp_path)!r}); sys.argv = ['main']; "
            "runpy.run_module('training.main', run_name='__main__', alter_sys=True); "
            "print(sys.modules['training'] is not sys.modules.get('open_clip_train'), "
            f"sys.modules['training'].__file__.startswith({str(tmp_path)!r}))")
    result = _isolated_python(target_install, code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ['USER-TRAINING-MAIN', 'True', 'True']


def test_torchrun_training_main_trains_one_epoch(tmp_path):
    """The original fork's command line, with this environment's install (its .pth processed)."""
    train = write_rank_csv(str(tmp_path), per_count=4, name='train.csv')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '1', '--master_port', str(free_port()),
           '-m', 'training.main', '--model', 'tiny-vit-adapter', '--dataset-type', 'csv',
           '--csv-dataset-sample-type', 'rank', '--train-data', train, '--batch-size', '8', '--lr', '1e-3',
           '--warmup', '2', '--workers', '1', '--epochs', '1', '--loss-opt', 'dual-head',
           '--loss-components', 'regression', 'rank', '--name', 'alias', '--save-frequency', '1']
    # no --logs flag: torchrun's parser rejects it (ambiguous with --logs-specs); OpenCLIP writes ./logs
    result = _run(cmd, subprocess_env(OPEN_CLIP_RANK_MODEL_CONFIGS=str(TEST_CONFIG_DIR)), cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / 'logs' / 'alias' / 'checkpoints' / 'epoch_1.pt').is_file()
