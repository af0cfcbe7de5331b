"""Optimiser options OpenCLIP has no switch for (integration/optimizer.py): --amsgrad, --param-group-lr (the official
OrdinalCLIP per-group and staged rates) and --lr-scheduler multistep; checkpoints keep OpenCLIP's optimiser layout so
--resume works."""
import subprocess
import sys
from argparse import Namespace

import pytest
import torch

import open_clip
from open_clip_rank.integration import optimizer as opt
from helpers import TEST_CONFIG_DIR, subprocess_env, write_rank_csv


def _openclip_adamw(model, lr=1e-3, wd=0.2):
    """The optimiser OpenCLIP's main builds: gains/biases without weight decay, the rest with it."""
    exclude = lambda n, p: p.ndim < 2 or 'bn' in n or 'ln' in n or 'bias' in n or 'logit_scale' in n  # noqa: E731
    named = list(model.named_parameters())
    return torch.optim.AdamW([{'params': [p for n, p in named if exclude(n, p) and p.requires_grad], 'weight_decay': 0.},
                              {'params': [p for n, p in named if not exclude(n, p) and p.requires_grad],
                               'weight_decay': wd}], lr=lr, betas=(0.9, 0.98), eps=1e-6)


def _args(**kw):
    base = dict(amsgrad=False, param_group_lr=None, lr=1e-3, opt='adamw', lr_scheduler='cosine', lr_milestones=None,
                lr_gamma=0.1)
    base.update(kw)
    return Namespace(**base)


def _step(model, optimizer):
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    optimizer.step()


@pytest.mark.unit
def test_groups_split_by_the_longest_prefix_in_order():
    model = open_clip.create_model('tiny-vit')
    optimizer = _openclip_adamw(model)
    args = _args(param_group_lr=['visual.=1e-4', 'visual.proj=2e-3', 'nothing.=1'])
    opt.configure_optimizer(optimizer, args, model)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group['params']:
            name = names[id(p)]
            want = 2.0 if name.startswith('visual.proj') else 0.1 if name.startswith('visual.') else 1.0
            assert group['lr_scale'] == pytest.approx(want), name
    assert sum(len(g['params']) for g in optimizer.param_groups) == sum(1 for p in model.parameters() if p.requires_grad)
    assert {g['weight_decay'] for g in optimizer.param_groups} == {0.0, 0.2}  # OpenCLIP's decay split kept


@pytest.mark.unit
def test_checkpoint_layout_resumes_into_openclips_optimizer():
    torch.manual_seed(0)
    model = open_clip.create_model('tiny-vit')
    args = _args(amsgrad=True, param_group_lr=['visual.=1e-4'])
    optimizer = _openclip_adamw(model)
    opt.configure_optimizer(optimizer, args, model)
    assert all(g['amsgrad'] for g in optimizer.param_groups) and len(optimizer.param_groups) == 4
    _step(model, optimizer)
    saved = opt.state_dict_in_openclip_layout(optimizer)
    assert len(saved['param_groups']) == 2 and all(g['amsgrad'] for g in saved['param_groups'])
    assert not any('lr_scale' in g for g in saved['param_groups'])
    resumed = _openclip_adamw(model)  # what main builds on --resume, then loads
    resumed.load_state_dict(saved)
    opt.configure_optimizer(resumed, args, model)
    for p in model.parameters():
        torch.testing.assert_close(resumed.state[p]['max_exp_avg_sq'], optimizer.state[p]['max_exp_avg_sq'])
        torch.testing.assert_close(resumed.state[p]['exp_avg'], optimizer.state[p]['exp_avg'])
    assert [len(g['params']) for g in resumed.param_groups] == [len(g['params']) for g in optimizer.param_groups]
    assert opt.state_dict_in_openclip_layout(_openclip_adamw(model)) is None  # untouched optimisers: as OpenCLIP


@pytest.mark.unit
def test_group_rates_and_multistep_follow_openclips_schedule():
    from open_clip_train.scheduler import const_lr
    model = open_clip.create_model('tiny-vit')
    optimizer = _openclip_adamw(model, lr=1e-3)
    args = _args(param_group_lr=['visual.=1e-4'], rank_lr_scheduler='multistep', lr_milestones=[2, 3], lr_gamma=0.1)
    opt.configure_optimizer(optimizer, args, model)
    steps_per_epoch, warmup = 10, 4
    schedule = opt.wrap_scheduler(const_lr(optimizer, 1e-3, warmup, 50), optimizer, args, steps_per_epoch)

    def rates(step):
        schedule(step)
        return sorted({round(g['lr'], 12) for g in optimizer.param_groups})

    assert rates(0) == pytest.approx([1e-4 * 1 / warmup, 1e-3 * 1 / warmup])  # OpenCLIP's warm-up, per group
    assert rates(5) == pytest.approx([1e-4, 1e-3])
    assert rates(19) == pytest.approx([1e-4, 1e-3])
    assert rates(20) == pytest.approx([1e-5, 1e-4])  # epoch 2: first milestone
    assert rates(35) == pytest.approx([1e-6, 1e-5])
    assert opt.multistep_factor(1.99, [2], 0.5) == 1 and opt.multistep_factor(2, [2], 0.5) == 0.5


@pytest.mark.unit
@pytest.mark.parametrize('flags, message', [
    (['--amsgrad', '--opt', 'timm/sgd'], '--amsgrad needs an Adam-type optimiser'),
    (['--lr-scheduler', 'multistep'], '--lr-scheduler multistep needs --lr-milestones'),
    (['--lr-milestones', '5'], '--lr-milestones is for --lr-scheduler multistep'),
    (['--param-group-lr', 'visual.'], "--param-group-lr 'visual.': give PREFIX=LR"),
    (['--param-group-lr', 'visual.=-1'], "give PREFIX=LR"),
])
def test_bad_combinations_are_refused_in_one_line(tmp_path, capsys, flags, message):
    import open_clip_train.params
    csv = write_rank_csv(str(tmp_path), per_count=2, name='train.csv')
    with pytest.raises(SystemExit) as exit_:
        open_clip_train.params.parse_args(['--model', 'tiny-vit-adapter', '--dataset-type', 'csv',
                                           '--csv-dataset-sample-type', 'rank', '--train-data', csv, '--batch-size',
                                           '4', '--lr', '1e-3', *flags])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.e2e
def test_a_run_with_every_option_trains_saves_and_resumes(tmp_path):
    """Through OpenCLIP's own main: amsgrad, a staged image-tower rate and a multi-step decay; the checkpoint resumes."""
    csv = write_rank_csv(str(tmp_path), per_count=2, name='train.csv')
    logs = tmp_path / 'logs'
    cmd = [sys.executable, '-m', 'open_clip_train.main', '--model', 'tiny-vit-adapter', '--dataset-type', 'csv',
           '--csv-dataset-sample-type', 'rank', '--train-data', csv, '--batch-size', '8', '--lr', '1e-3',
           '--warmup', '1', '--workers', '0', '--seed', '0', '--logs', str(logs), '--name', 'run',
           '--amsgrad', '--param-group-lr', 'visual.=1e-4', 'adapter.=2e-3', '--lr-scheduler', 'multistep',
           '--lr-milestones', '1', '--lr-gamma', '0.5']
    env = subprocess_env(OPEN_CLIP_RANK_MODEL_CONFIGS=TEST_CONFIG_DIR)
    first = subprocess.run([*cmd, '--epochs', '2'], env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    log = (logs / 'run' / 'out.log').read_text()
    assert '--param-group-lr visual.=0.0001' in log and '--param-group-lr adapter.=0.002' in log
    checkpoint = torch.load(logs / 'run' / 'checkpoints' / 'epoch_2.pt', map_location='cpu', weights_only=True)
    groups = checkpoint['optimizer']['param_groups']
    assert len(groups) == 2 and all(g['amsgrad'] for g in groups)  # OpenCLIP's layout, amsgrad kept
    resumed = subprocess.run([*cmd, '--epochs', '3', '--resume', 'latest'], env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (logs / 'run' / 'checkpoints' / 'epoch_3.pt').is_file()
    # the run folder alone is enough to rank: its config.json and a checkpoint
    from open_clip_rank.rank import main
    from helpers import call_main
    ranked = call_main(main, ['--config-path', logs / 'run' / 'config.json', '--checkpoint-path',
                              logs / 'run' / 'checkpoints' / 'epoch_3.pt', '--csv', csv, '--device', 'cpu',
                              '--output-path', tmp_path / 'ranked', '--no-progress', '--workers', '0'])
    assert ranked.returncode == 0, ranked.stderr[-3000:]
    assert (tmp_path / 'ranked.json').is_file()
