"""Every patch point the plugin relies on is live, and a moved one fails loudly at import."""
import contextlib
import subprocess
import sys
import types
from types import SimpleNamespace

import pytest
import torch

import open_clip
import open_clip_train.data
import open_clip_train.distributed
import open_clip_train.file_utils
import open_clip_train.logger
import open_clip_train.params
import open_clip_train.train
from open_clip import factory
from open_clip_rank.integration import compat, hook
from open_clip_rank.registry import FAMILIES
from helpers import subprocess_env


@pytest.mark.unit
def test_factory_patch_points_are_live():
    for name in ('CLIP', 'CustomTextCLIP', 'load_checkpoint', 'create_loss'):
        assert compat.is_patched(getattr(factory, name)), name
    assert open_clip.load_checkpoint is factory.load_checkpoint
    assert open_clip.create_loss is factory.create_loss
    # create_model really goes through the dispatchers: a family config builds that family's class
    model = open_clip.create_model('tiny-vit-adapter')
    assert type(model).__name__ == FAMILIES['adapter'].clip_class
    assert type(open_clip.create_model('tiny-vit')) is open_clip.CLIP
    assert compat.pretrained_registry()['convnext_large_d_320-adapter'] is compat.pretrained_registry()[
        'convnext_large_d_320']


@pytest.mark.unit
@pytest.mark.parametrize('module', [open_clip_train.params, open_clip_train.data, open_clip_train.train,
                                    open_clip_train.distributed, open_clip_train.logger,
                                    open_clip_train.file_utils])
def test_training_patch_points_are_live(module):
    name = compat.TRAINING_PATCH_POINTS[module.__name__.rsplit('.', 1)[-1]]
    assert compat.is_patched(getattr(module, name))


@pytest.mark.unit
def test_openclip_train_main_still_calls_what_is_patched():
    compat.check_training_package('open_clip_train', open_clip.__version__)
    import open_clip_train.main as main  # its from-imports bound the patched functions
    assert compat.is_patched(main.parse_args) and compat.is_patched(main.get_data)
    assert compat.is_patched(main.evaluate) and compat.is_patched(main.create_loss)
    assert compat.is_patched(main.setup_logging) and compat.is_patched(main.pt_load)
    assert compat.is_patched(main.init_distributed_device)
    # main writes checkpoints with a plain torch.save: parsing a run's arguments routes it (atomic writes)
    import torch
    main.parse_args([])
    assert compat.is_patched(torch.save)


@pytest.mark.unit
def test_moved_patch_points_fail_with_one_line(monkeypatch):
    moved = types.ModuleType('open_clip_train.data')  # e.g. get_data renamed upstream
    with pytest.raises(compat.PatchPointMissing) as info:
        compat.training_patch_point(moved, '9.9.0')
    message = str(info.value)
    assert '\n' not in message
    assert 'open_clip_train.data.get_data' in message and compat.SUPPORTED_OPENCLIP in message

    def create_model(*args, **kwargs):  # a create_model that no longer looks up CLIP in the module
        return None

    monkeypatch.setattr(factory, 'create_model', create_model)
    with pytest.raises(compat.PatchPointMissing, match=r"create_model -> CLIP .*open_clip_torch>=3.3,<3.4"):
        compat.check_factory(open_clip)


@pytest.mark.unit
def test_main_routed_elsewhere_is_detected(tmp_path, monkeypatch):
    """OpenCLIP's main branch routes main.py through create_task: no create_loss call left in main."""
    package = tmp_path / 'fake_train'
    package.mkdir()
    (package / '__init__.py').write_text('')
    (package / 'main.py').write_text('def main(args):\n    task = create_task(parse_args(args))\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(compat.PatchPointMissing, match=r'fake_train.main -> get_data'):
        compat.check_training_package('fake_train', '3.4.0')


@pytest.mark.e2e
def test_plugin_import_fails_loudly_when_openclip_moved():
    """A fresh interpreter whose OpenCLIP lacks a patch point: ``import open_clip`` raises one named line."""
    code = ("import open_clip.factory as f; del f.CustomTextCLIP; import open_clip_rank.integration.hook as h; h.register()")
    result = subprocess.run([sys.executable, '-c', code], env=subprocess_env(OPEN_CLIP_RANK_AUTOLOAD='0'),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert 'open_clip.factory.CustomTextCLIP' in last and 'open_clip_torch>=3.3,<3.4' in last


@pytest.mark.unit
@pytest.mark.parametrize('val_frequency,epochs', [(1, 3), (2, 5), (3, 4), (0, 2)])
def test_val_schedule_is_openclips(val_frequency, epochs):
    """The rank evaluation runs exactly when OpenCLIP's own evaluate runs its validation pass."""

    ran = []
    model = open_clip.create_model('tiny-vit')
    args = SimpleNamespace(distributed=False, horovod=False, rank=0, local_rank=0, log_local=False, device='cpu',
                           precision='fp32', val_frequency=val_frequency, epochs=epochs, zeroshot_frequency=0,
                           save_logs=False, wandb=False)
    openclip_evaluate = open_clip_train.train.evaluate.__wrapped__
    for epoch in range(epochs + 1):
        with pytest.raises(_Stop) if compat.openclip_evaluates_val(args, epoch) else _nothing():
            openclip_evaluate(model, {'val': SimpleNamespace(dataloader=_Probe(ran, epoch))}, epoch, args)
        assert compat.openclip_evaluates_val(args, epoch) == (epoch in ran), epoch


@contextlib.contextmanager
def _nothing():
    yield


class _Stop(Exception):
    pass


class _Probe:
    num_samples = 0

    def __init__(self, ran, epoch):
        self.ran, self.epoch = ran, epoch

    def __iter__(self):
        self.ran.append(self.epoch)
        raise _Stop


@pytest.mark.unit
def test_cpu_ddp_shim_only_drops_cpu_device_ids():
    ddp = torch.nn.parallel.DistributedDataParallel
    try:
        compat.allow_cpu_ddp_device_ids()
        shim = torch.nn.parallel.DistributedDataParallel
        assert issubclass(shim, ddp) and shim is not ddp
        compat.allow_cpu_ddp_device_ids()  # idempotent
        assert torch.nn.parallel.DistributedDataParallel is shim
    finally:
        torch.nn.parallel.DistributedDataParallel = ddp


@pytest.mark.unit
def test_register_is_idempotent():
    before = factory.CLIP
    hook.register()
    assert factory.CLIP is before


@pytest.mark.unit
def test_zero_shot_accuracy_fix_counts_as_openclip_does():
    import open_clip_train.zero_shot as zero_shot
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(20, 7, generator=g), torch.randint(0, 7, (20,), generator=g)
    top1, top5 = compat.topk_correct(logits, target, topk=(1, 5))
    ranked = logits.argsort(dim=1, descending=True)
    assert top1 == float((ranked[:, 0] == target).sum())
    assert top5 == float((ranked[:, :5] == target[:, None]).any(dim=1).sum())
    if compat.numpy_rejects_size_one_arrays():  # the fix is in place exactly where OpenCLIP's own would fail
        assert compat.is_patched(zero_shot.accuracy)
        assert zero_shot.accuracy(logits, target, topk=(1, 5)) == [top1, top5]
    else:
        assert zero_shot.accuracy(logits, target, topk=(1, 5)) == [top1, top5]


@pytest.mark.unit
def test_openclip_data_building_blocks_are_present_and_a_missing_one_is_named(monkeypatch):
    from open_clip_train import data
    from open_clip_rank.integration import compat
    assert compat.openclip_data('DataInfo') is data.DataInfo
    assert len(compat.openclip_data(*compat.OPENCLIP_DATA_NAMES)) == len(compat.OPENCLIP_DATA_NAMES)
    monkeypatch.delattr(data, 'detshuffle2')
    with pytest.raises(compat.PatchPointMissing, match=r'no patch point open_clip_train.data.detshuffle2; .*supports'):
        compat.openclip_data('DataInfo')


@pytest.mark.unit
def test_quiet_torch_loggers_respects_torch_logs(monkeypatch):
    import logging
    inner = logging.getLogger('torch._dynamo.test_quiet_probe')
    for name in ('torch', inner.name):
        monkeypatch.setattr(logging.getLogger(name), 'level', logging.INFO)
    monkeypatch.setenv('TORCH_LOGS', '+dynamo')
    compat.quiet_torch_loggers()
    assert inner.level == logging.INFO  # torch's own switch is set: left alone
    monkeypatch.delenv('TORCH_LOGS')
    compat.quiet_torch_loggers()
    assert inner.level == logging.WARNING and logging.getLogger('torch').level == logging.WARNING


@pytest.mark.unit
def test_torch_private_names_the_adapter_uses_are_live(monkeypatch):
    from torch import nn
    compat.check_torch_private_names()  # the installed torch has them
    monkeypatch.delattr(nn.TransformerEncoderLayer, '_ff_block')
    with pytest.raises(compat.PatchPointMissing, match=r'TransformerEncoderLayer\._ff_block') as info:
        compat.check_torch_private_names()
    assert '\n' not in str(info.value)


@pytest.mark.unit
def test_sample_types_are_one_registry_entry_each(monkeypatch):
    # what the hook, the start checks and evaluation dispatch through: every function a registered sample type
    # names exists, and each family trains only on registered sample types
    from open_clip_rank import registry
    from open_clip_rank.integration.flags import sample_type_choices
    assert sample_type_choices() == ('default', *registry.SAMPLE_TYPES)
    for sample_type in registry.SAMPLE_TYPES.values():
        for role in ('data_builder', 'data_check', 'validation'):
            assert callable(registry.import_function(getattr(sample_type, role))), (sample_type.name, role)
    for family in FAMILIES.values():
        assert set(family.sample_types) <= set(registry.SAMPLE_TYPES)
    monkeypatch.setattr(registry, 'FAMILIES', dict(FAMILIES))  # a bad registration must leave the table alone
    new = registry.RankFamily(name='x', config_key='x_cfg', suffix='-x', model_module='m', clip_class='A',
                              custom_text_class='B', default_loss='single-head', sample_types=('pairs',))
    with pytest.raises(ValueError, match=r"unregistered sample type\(s\) \['pairs'\]"):
        registry.register_family(new)


@pytest.mark.unit
@pytest.mark.parametrize('env', [{}, {'LOCAL_RANK': '1', 'RANK': '3', 'WORLD_SIZE': '4'},
                                 {'SLURM_LOCALID': '0', 'SLURM_PROCID': '5', 'SLURM_NTASKS': '8'},
                                 {'PMI_RANK': '2', 'PMI_SIZE': '3', 'SLURM_NTASKS': '9'},
                                 {'OMPI_COMM_WORLD_LOCAL_RANK': '1', 'OMPI_COMM_WORLD_RANK': '1',
                                  'OMPI_COMM_WORLD_SIZE': '2'}])
def test_launch_ranks_read_the_environment_as_openclip_does(monkeypatch, env):
    for names in compat.LAUNCH_VARIABLES:
        for name in names:
            monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert compat.launch_ranks() == open_clip_train.distributed.world_info_from_env()
