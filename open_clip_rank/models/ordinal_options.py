"""The OrdinalCLIP family's training flags, their checks and its start check (declared in ``builtin.py``):
``--ordinal-freeze-context`` and ``--ordinal-freeze-ranks``, the official prompt-learner ablations (tune-rank.yaml /
tune-ctx.yaml: learning rate 0 for one part). The model reads them from the training run
(``integration/run_state.py``) when OpenCLIP's main builds it, before the optimiser collects the trainable
parameters."""


def add_ordinal_model_args(parser):
    group = parser.add_argument_group('open_clip_rank: OrdinalCLIP models (*-ordinal)')
    group.add_argument(
        '--ordinal-freeze-context', action='store_true', default=False,
        help='Ordinal models: the context embeddings of the rank prompts are not trained (they keep their '
             'initialisation: init_context\'s words, or random); only the rank embeddings learn (the official '
             'tune-rank.yaml ablation). Not for the baseline (it has no context). Default: both train.')
    group.add_argument(
        '--ordinal-freeze-ranks', action='store_true', default=False,
        help='Ordinal models: the rank embeddings (the base ranks, or every rank of the plain learner) are not '
             'trained; only the context learns (the official tune-ctx.yaml ablation). On a baseline model '
             '(prompt_learner "baseline") its class prototypes stay at their initialisation, as the official runner '
             'leaves them (no learning rate). Default: both train.')


def _is_ordinal_model(args) -> bool:
    from ..registry import family_for_model_name
    family = family_for_model_name(getattr(args, 'model', None))
    return family is not None and family.config_key == 'ordinal_cfg'


def check_ordinal_model_args(args):
    flags = [flag for flag, on in (('--ordinal-freeze-context', getattr(args, 'ordinal_freeze_context', False)),
                                   ('--ordinal-freeze-ranks', getattr(args, 'ordinal_freeze_ranks', False))) if on]
    if flags and not _is_ordinal_model(args):
        raise ValueError(f"{flags[0]} is for ordinal models (*-ordinal configs), not {args.model}.")


def check_ordinal_start(args, model_cfg):
    """The baseline has no context embeddings to freeze."""
    prompt_learner = (model_cfg.get('ordinal_cfg') or {}).get('prompt_learner')
    if getattr(args, 'ordinal_freeze_context', False) and prompt_learner == 'baseline':
        raise ValueError(f"--ordinal-freeze-context: model {args.model} is the baseline (ordinal_cfg.prompt_learner "
                         f"'baseline': class prototypes, no prompts), which has no context embeddings; use "
                         f"--ordinal-freeze-ranks to keep its prototypes fixed, or drop the flag.")
