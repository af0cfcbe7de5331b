"""The adapter family's training flags, their checks and its start check (declared in ``builtin.py``):
``--strict-tower-lock``, ``--lock-image-eval`` and ``--rank-feature-cache``. The models read the first two from the
training run (``integration/run_state.py``) when OpenCLIP's main locks their towers."""


def add_adapter_args(parser):
    group = parser.add_argument_group('open_clip_rank: adapter models (*-adapter)')
    group.add_argument(
        '--strict-tower-lock', action='store_true', default=False,
        help='Adapter models: --lock-image / --lock-text freeze the whole tower. Default, as the original code: '
             '--lock-text freezes only the text transformer blocks (token/positional embeddings and ln_final train) '
             'and --lock-image keeps a ViT\'s visual.proj trainable.')
    group.add_argument(
        '--lock-image-eval', action='store_true', default=False,
        help='Adapter models with --lock-image: the locked image tower runs in eval mode while training (no '
             'stochastic depth, dropout or patch dropout; BatchNorm with running statistics), so its features '
             'are deterministic. Needed by --rank-feature-cache for towers with stochastic depth (e.g. '
             'convnext_large_d_320\'s timm_drop_path 0.1). Default: as OpenCLIP, the locked tower is in '
             'training mode.')
    group.add_argument(
        '--rank-feature-cache', type=str, default=None, metavar='DIR',
        help='Adapter training with a frozen image tower (--lock-image): store the tower\'s outputs (ViT tokens '
             'before visual.proj, ResNet layer-4 maps before visual_proj) once per image and flip view in a '
             'memory-mapped file per process under DIR, and train later epochs from it instead of running the '
             'tower. Keyed by model, weights, transform and data (a change builds a new cache); partial or corrupt '
             'entries are recomputed. Both views of the random flip are stored (a miss runs the tower twice).')
    group.add_argument('--rank-feature-cache-dtype', choices=('fp16', 'bf16', 'fp32'), default='fp16',
                       help='Storage type of --rank-feature-cache.')


def _is_adapter_model(args) -> bool:
    from ..registry import family_for_model_name
    family = family_for_model_name(getattr(args, 'model', None))
    return family is not None and family.config_key == 'adapter_cfg'


def check_feature_cache_args(args):
    """``--rank-feature-cache`` caches what ``--lock-image`` freezes, on CSV rank data; refuse what would make a
    cached output differ from the tower's."""
    if not getattr(args, 'rank_feature_cache', None):
        return
    from ..data.shards import uses_shards
    why = None
    if args.csv_dataset_sample_type != 'rank':
        why = f"it needs --csv-dataset-sample-type rank (got {args.csv_dataset_sample_type})"
    elif not getattr(args, 'lock_image', False):
        why = "it needs a frozen image tower: add --lock-image"
    elif getattr(args, 'lock_image_unlocked_groups', 0) > 0:
        why = "--lock-image-unlocked-groups > 0 trains part of the image tower"
    elif uses_shards(args):
        why = "it keys images by CSV row; streamed shards are not supported (use --dataset-type csv)"
    elif getattr(args, 'force_patch_dropout', None) and not getattr(args, 'lock_image_eval', False):
        why = "--force-patch-dropout drops tokens at random (add --lock-image-eval: the locked tower then runs " \
              "without it)"
    if why:
        raise ValueError(f"--rank-feature-cache: {why}.")


def check_lock_image_eval_args(args):
    if not getattr(args, 'lock_image_eval', False):
        return
    if not _is_adapter_model(args):
        raise ValueError(f"--lock-image-eval is for adapter models (*-adapter configs), not {args.model}.")
    if not getattr(args, 'lock_image', False) or getattr(args, 'lock_image_unlocked_groups', 0) > 0:
        raise ValueError("--lock-image-eval runs a fully locked image tower in eval mode: add --lock-image "
                         "(without --lock-image-unlocked-groups).")


def check_adapter_args(args):
    check_feature_cache_args(args)
    check_lock_image_eval_args(args)


def check_adapter_start(args, model_cfg):
    """The pair losses need a pair head; the per-image pooler ablations ('softmax', 'sigmoid') have none."""
    from ..registry import LOSSES
    explicit = LOSSES.get(getattr(args, 'loss_opt', None))
    needs_head = explicit is not None and explicit.needs_pair_head
    if not needs_head and not getattr(args, 'rank_global_pairs', False):
        return
    from .adapter_layers import PER_IMAGE_POOLERS
    pooler = (model_cfg.get('adapter_cfg') or {}).get('adapter_attention_pooler')
    if pooler in PER_IMAGE_POOLERS:
        flag = f'--loss-opt {args.loss_opt}' if needs_head else '--rank-global-pairs'
        raise ValueError(f"{flag} needs the pair head, and model {args.model} (adapter_attention_pooler="
                         f"{pooler!r}) has none (the original gives it one feature per image, not pairs): train "
                         f"it with --loss-opt single-head.")


def report_feature_cache_use(args, epoch):
    """``--rank-feature-cache``: the epoch's cache hits and misses, in the log."""
    if getattr(args, 'rank_feature_cache', None):
        from ..data.feature_cache import log_epoch_usage
        log_epoch_usage(epoch)
