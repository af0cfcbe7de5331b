"""Optimiser and schedule options OpenCLIP's ``main`` has no switch for: ``--amsgrad``, per-parameter-group learning
rates (``--param-group-lr``) and a multi-step decay (``--lr-scheduler multistep``).

OpenCLIP builds its optimiser inline in ``main`` (``optim.AdamW`` over two groups, gains/biases without weight decay
and the rest, or timm's ``create_optimizer_v2`` for ``--opt timm/...``) and its schedule as a closure that assigns one
learning rate to every group at each step; ``main`` runs as ``__main__``, so neither can be replaced before it
runs. The plugin adjusts what they made, at the patch points it already has:

* before the first step (the ``train_one_epoch`` wrapper, ``configure_optimizer``), each of OpenCLIP's groups is
  split by the ``--param-group-lr`` rules (the longest matching parameter-name prefix decides; the rule's rate is
  kept as ``lr_scale`` = rule / ``--lr``) and ``amsgrad`` is switched on for Adam-type optimisers. Optimiser state
  is keyed by parameter, so splitting keeps it;
* the run's checkpoints store the optimiser in OpenCLIP's own layout (``state_dict_in_openclip_layout``, applied by
  the checkpoint-save patch), so ``--resume`` loads it into the optimiser ``main`` builds, and the split happens
  again before the first step (``amsgrad`` travels in the groups' hyperparameters);
* each step, after OpenCLIP's schedule has set the learning rate, every group's rate is multiplied by its
  ``lr_scale`` and, for ``multistep``, by ``gamma`` per milestone epoch passed (OpenCLIP's ``const`` schedule runs
  underneath, so ``--warmup`` warms up in steps as usual; ``params.txt`` records ``lr_scheduler: const`` beside
  ``rank_lr_scheduler: multistep``).

The update of Adam, AdamW, RAdam and SGD is linear in the learning rate, so a group's rate is exactly a per-group
learning rate as the official OrdinalCLIP runner sets them.
"""
import logging
from typing import Dict, List, Optional, Tuple

_logger = logging.getLogger(__name__)

MULTISTEP = 'multistep'
ADAM_TYPES = ('Adam', 'AdamW')


# --- flags ----------------------------------------------------------------------------------------------

def add_optimizer_args(group) -> None:
    group.add_argument('--amsgrad', action='store_true',
                       help='AdamW with amsgrad (how the released ranking-aware adapter checkpoints were trained); '
                            'with --opt adamw, timm/adamw or timm/adam.')
    group.add_argument('--param-group-lr', type=str, nargs='+', default=None, metavar='PREFIX=LR',
                       help='Learning rates per parameter-name prefix (the longest matching prefix wins, others keep '
                            '--lr), scaled by the schedule like --lr; e.g. OrdinalCLIP\'s per-group rates: '
                            'prompt_learner.context_embeds=1e-4 prompt_learner.rank_embeds=1e-4 visual.=1e-5 '
                            'visual.head.=1e-4 (a staged image-tower rate).')
    group.add_argument('--lr-milestones', type=float, nargs='+', default=None, metavar='EPOCH',
                       help='--lr-scheduler multistep: epochs after which the learning rate is multiplied by '
                            '--lr-gamma (OrdinalCLIP\'s official schedule: 60, or 70 90).')
    group.add_argument('--lr-gamma', type=float, default=0.1, help='--lr-scheduler multistep: the decay factor.')


def parse_group_rules(values) -> List[Tuple[str, float]]:
    rules = []
    for value in values or ():
        prefix, sep, lr = value.partition('=')
        try:
            rate = float(lr)
        except ValueError:
            rate = None
        if not sep or not prefix or rate is None or rate < 0:
            raise ValueError(f"--param-group-lr {value!r}: give PREFIX=LR with a parameter-name prefix and a learning "
                             f"rate >= 0, e.g. visual.=1e-5.")
        rules.append((prefix, rate))
    return rules


def check_optimizer_args(args) -> None:
    """One line per bad combination (ValueError), before anything is built."""
    opt = (getattr(args, 'opt', 'adamw') or 'adamw').lower()
    if args.amsgrad and opt not in ('adamw', 'timm/adamw', 'timm/adam'):
        raise ValueError(f"--amsgrad needs an Adam-type optimiser (--opt adamw, timm/adamw or timm/adam), got --opt "
                         f"{args.opt}.")
    rules = parse_group_rules(args.param_group_lr)
    if rules and not args.lr:
        raise ValueError("--param-group-lr needs --lr (the rates are scaled by the schedule relative to it).")
    scheduler = getattr(args, 'lr_scheduler', 'cosine')
    if scheduler == MULTISTEP and not args.lr_milestones:
        raise ValueError("--lr-scheduler multistep needs --lr-milestones EPOCH [EPOCH ...] (e.g. 60).")
    if args.lr_milestones and scheduler != MULTISTEP:
        raise ValueError("--lr-milestones is for --lr-scheduler multistep.")


def configure_optimizer_run(args) -> None:
    """OpenCLIP's ``main`` knows no ``multistep``: it builds ``const`` (with its warm-up) and the plugin decays it."""
    args.rank_lr_scheduler = getattr(args, 'lr_scheduler', 'cosine')
    if args.rank_lr_scheduler == MULTISTEP:
        args.lr_scheduler = 'const'


def needs_optimizer_changes(args) -> bool:
    return bool(getattr(args, 'amsgrad', False) or getattr(args, 'param_group_lr', None))


# --- before the first step -----------------------------------------------------------------------------

_LAYOUT = '_open_clip_rank_openclip_layout'  # on the optimiser: OpenCLIP's groups (hyperparameters, parameters)
_PLUGIN_KEYS = ('lr_scale', 'param_group_rule')


def _rule_for(name: str, rules) -> Optional[Tuple[str, float]]:
    matching = [r for r in rules if name.startswith(r[0])]
    return max(matching, key=lambda r: len(r[0])) if matching else None


def split_groups(param_groups: List[dict], names: Dict[int, str], rules, base_lr: float) -> List[dict]:
    """Each group split by the rule of its parameters' names (order kept); ``lr_scale`` = rule's rate / ``base_lr``."""
    out = []
    for group in param_groups:
        parts: Dict[Optional[Tuple[str, float]], list] = {}
        for p in group['params']:
            parts.setdefault(_rule_for(names.get(id(p), ''), rules), []).append(p)
        for rule, params in parts.items():
            scale = 1.0 if rule is None else rule[1] / base_lr
            out.append({**group, 'params': params, 'lr_scale': scale,
                        'param_group_rule': None if rule is None else f'{rule[0]}={rule[1]:g}'})
    return out


def _enable_amsgrad(optimizer, args) -> None:
    if type(optimizer).__name__ not in ADAM_TYPES:
        raise ValueError(f"--amsgrad needs an Adam-type optimiser; --opt {args.opt} made {type(optimizer).__name__}.")
    optimizer.defaults['amsgrad'] = True
    for group in optimizer.param_groups:
        group['amsgrad'] = True
    for state in optimizer.state.values():  # resumed from a run without it: start the maximum at the average
        if 'exp_avg_sq' in state and 'max_exp_avg_sq' not in state:
            state['max_exp_avg_sq'] = state['exp_avg_sq'].clone()


def configure_optimizer(optimizer, args, model) -> None:
    """Apply ``--param-group-lr`` and ``--amsgrad`` to OpenCLIP's optimiser, once, before its first step."""
    if optimizer is None or getattr(optimizer, _LAYOUT, None) is not None or not needs_optimizer_changes(args):
        return
    setattr(optimizer, _LAYOUT, [({k: v for k, v in g.items() if k != 'params'}, list(g['params']))
                                 for g in optimizer.param_groups])
    rules = parse_group_rules(args.param_group_lr)
    if rules:
        names = {id(p): n.removeprefix('module.') for n, p in model.named_parameters()}
        optimizer.param_groups[:] = split_groups(optimizer.param_groups, names, rules, args.lr)
        used = {g['param_group_rule'].split('=')[0] for g in optimizer.param_groups if g['param_group_rule']}
        unused = [prefix for prefix, _ in rules if prefix not in used]
        if unused:
            _logger.warning(f"--param-group-lr: no trainable parameter starts with {', '.join(unused)} (frozen, or "
                            f"not in this model).")
        for group in optimizer.param_groups:
            if group['param_group_rule']:
                _logger.info(f"--param-group-lr {group['param_group_rule']}: {sum(p.numel() for p in group['params']):,} "
                             f"parameters (weight decay {group.get('weight_decay', 0)}).")
    if args.amsgrad:
        _enable_amsgrad(optimizer, args)


def state_dict_in_openclip_layout(optimizer) -> Optional[dict]:
    """``optimizer.state_dict()`` with OpenCLIP's groups (what ``main`` rebuilds on ``--resume``), or None when the
    plugin did not split them. Hyperparameters the plugin set on every part (``amsgrad``) are kept."""
    layout = getattr(optimizer, _LAYOUT, None)
    if layout is None:
        return None
    packed = optimizer.state_dict()
    ours = [p for g in optimizer.param_groups for p in g['params']]  # the numbering of ``packed``
    theirs = {id(p): i for i, p in enumerate(p for _, params in layout for p in params)}
    state = {theirs[id(ours[i])]: value for i, value in packed['state'].items()}
    groups = []
    for hyper, params in layout:
        part = next(g for g in optimizer.param_groups if any(q is params[0] for q in g['params'])) if params else {}
        current = {k: v for k, v in part.items() if k not in ('params', *_PLUGIN_KEYS)}
        groups.append({**hyper, **current, 'params': [theirs[id(p)] for p in params]})
    return {'state': state, 'param_groups': groups}


# --- each step -------------------------------------------------------------------------------------------

def multistep_factor(epoch: float, milestones, gamma: float) -> float:
    return gamma ** sum(epoch >= m for m in milestones)


def wrap_scheduler(scheduler, optimizer, args, steps_per_epoch: int):
    """OpenCLIP's schedule, then each group's ``lr_scale`` and the multi-step decay."""
    if scheduler is None or optimizer is None or getattr(scheduler, '_open_clip_rank_wrapped', False):
        return scheduler
    multistep = getattr(args, 'rank_lr_scheduler', None) == MULTISTEP
    if not multistep and all(g.get('lr_scale', 1.0) == 1.0 for g in optimizer.param_groups):
        return scheduler

    def adjust(step):
        lr = scheduler(step)
        factor = multistep_factor(step / max(steps_per_epoch, 1), args.lr_milestones, args.lr_gamma) \
            if multistep else 1.0
        for group in optimizer.param_groups:
            group['lr'] = group['lr'] * factor * group.get('lr_scale', 1.0)
        return lr * factor

    adjust._open_clip_rank_wrapped = True
    return adjust
