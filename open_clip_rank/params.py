"""The plugin's command-line flags, added to OpenCLIP's ``parse_args`` without copying it.

OpenCLIP builds its parser inside ``parse_args``, so there is no parser object to extend. The
wrapper first takes the plugin's own flags out of the argument list (a separate parser with
``allow_abbrev=False``, so it never swallows OpenCLIP's flags), lets OpenCLIP parse the rest, and
merges the two namespaces. ``--help`` prints OpenCLIP's help followed by the plugin's section.
"""
import argparse
import sys

from .losses import DEFAULT_COMPONENTS, LOSS_COMPONENTS, LOSS_SAMPLE_TYPES, LOSSES, resolved_loss_name
from .registry import SAMPLE_TYPES


def sample_types():
    """'default' (OpenCLIP's own CSV data) and every registered sample type."""
    return ('default', *SAMPLE_TYPES)


def add_plugin_args(parser: argparse.ArgumentParser):
    """Flags of open_clip_rank, in OpenCLIP's style (dashes; defaults as the original code)."""
    group = parser.add_argument_group(
        'open_clip_rank', 'Text-driven image ranking: ranking-aware adapter models (any *-adapter config) and '
                          'OrdinalCLIP models (any *-ordinal config).')
    group.add_argument(
        '--loss-opt', choices=tuple(LOSSES), default=None,
        help="Ranking loss: 'dual-head' orders pairs with the adapter's pair head, 'single-head' with score "
             "differences; 'ordinal' is OrdinalCLIP's CE + KL over rank logits. Default: the model family's loss "
             "for rank models (single-head for adapter models, as the original; ordinal for ordinal models), "
             "OpenCLIP's loss otherwise.")
    group.add_argument(
        '--loss-components', nargs='+', choices=LOSS_COMPONENTS, default=list(DEFAULT_COMPONENTS),
        help="Parts of the ranking loss: pairwise 'rank' BCE, 'regression' log(1 + smoothL1), 'bce' on target != 0.")
    group.add_argument('--rank-loss-weight', type=float, default=1.0, help='Weight of the pairwise rank loss.')
    group.add_argument('--regression-loss-weight', type=float, default=0.2, help='Weight of the regression loss.')
    group.add_argument('--bce-loss-weight', type=float, default=1.0, help='Weight of the target != 0 BCE loss.')
    group.add_argument(
        '--pair-loss-ignore-ties', action='store_true', default=False,
        help='Leave pairs with equal targets (and the diagonal) out of the pair loss. Default: as the original, '
             'they count with label 0.')
    group.add_argument('--ordinal-ce-weight', type=float, default=1.0, help='Weight of the ordinal cross-entropy.')
    group.add_argument('--ordinal-kl-weight', type=float, default=1.0,
                       help='Weight of the ordinal batch KL term (0 switches it off).')
    group.add_argument(
        '--csv-dataset-sample-type', choices=sample_types(), default='default',
        help="'rank': batches of one category (instruction) each, with targets, for adapter models; 'ordinal': "
             "shuffled batches of images with integer rank labels (a CSV with a --csv-value-key column, or an "
             "official list file 'path label [label ...]'), for *-ordinal models.")
    group.add_argument('--image-root', type=str, default=None,
                       help='Folder that relative image paths of ordinal data resolve against (the official '
                            'images_root). Default: the current directory.')
    group.add_argument(
        '--negative-ratio', type=float, default=0.2,
        help='Share of each rank batch drawn from other categories, captioned with the batch category, target 0.')
    group.add_argument(
        '--train-with-relevance-score', action='store_true', default=False,
        help='As the original option: each training batch draws a reference value Y in [0, --relevance-max-score); '
             'captions become "<instruction> by the relevance count to Y." and targets |value - Y|.')
    group.add_argument('--relevance-max-score', type=int, default=13,
                       help='Reference values for --train-with-relevance-score are 0..N-1 (the original: 13, counting).')
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
        '--rank-global-pairs', action='store_true', default=False,
        help='Pair losses (dual-head, single-head) form pairs over the global batch of all processes: every '
             'process gets the same category at each step (its --batch-size slice of one batch of batch-size x '
             'world-size rows) and the pair summaries, scores and targets are gathered, so the pair loss sees '
             'N = B x W images (gradients exact; --gather-with-grad gathers with gradient). Default: pairs '
             'within each process\'s batch, as the original.')
    group.add_argument(
        '--rank-feature-cache', type=str, default=None, metavar='DIR',
        help='Adapter training with a frozen image tower (--lock-image): store the tower\'s outputs (ViT tokens '
             'before visual.proj, ResNet layer-4 maps before visual_proj) once per image and flip view in a '
             'memory-mapped file per process under DIR, and train later epochs from it instead of running the '
             'tower. Keyed by model, weights, transform and data (a change builds a new cache); partial or corrupt '
             'entries are recomputed. Both views of the random flip are stored (a miss runs the tower twice).')
    group.add_argument('--rank-feature-cache-dtype', choices=('fp16', 'bf16', 'fp32'), default='fp16',
                       help='Storage type of --rank-feature-cache.')
    group.add_argument('--csv-value-key', type=str, default='value', help='CSV column of the ranking target.')
    group.add_argument('--csv-category-key', type=str, default='cname',
                       help='CSV column of the category word that appears in the caption.')
    group.add_argument('--csv-weight-key', type=str, default='sample_weights_by_class',
                       help='Optional CSV column of per-row sampling weights within a category.')
    add_rankclip_args(parser)
    return parser


def add_rankclip_args(parser: argparse.ArgumentParser):
    """Flags of ``--loss-opt rankclip`` (RankCLIP pretraining of plain CLIP models)."""
    group = parser.add_argument_group(
        'open_clip_rank: RankCLIP', '--loss-opt rankclip: contrastive loss + w(epoch) * (cross-modal + in-modal '
        'ListMLE ranking consistency), on any plain CLIP model and ordinary image-caption data.')
    group.add_argument('--rankclip-crossmodal-weight', type=float, default=1.0,
                       help='Weight of the cross-modal ListMLE term (the original lambda2); 0 leaves it out.')
    group.add_argument('--rankclip-inmodal-weight', type=float, default=1.0,
                       help='Weight of the in-modal ListMLE term (the original lambda1); 0 leaves it out.')
    group.add_argument('--rankclip-ramp-peak', type=float, default=2.0,
                       help='Largest rank-loss weight w (reached at the end of the ramp). Default 2, as the original.')
    group.add_argument('--rankclip-ramp-epochs', type=float, default=None,
                       help='Epochs over which w rises linearly from 0 (epoch 1) to the peak. Default: two thirds '
                            'of (epochs - 1), the original clamp(3(e-1)/(E-1), 0, 2). 0: no ramp (the peak from '
                            'the first epoch; also what a one-epoch run gets).')
    return parser


def validate_rankclip_args(args):
    if getattr(args, 'loss_opt', None) != 'rankclip':
        return
    for flag in ('rankclip_crossmodal_weight', 'rankclip_inmodal_weight', 'rankclip_ramp_peak'):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}.")
    if args.rankclip_ramp_epochs is not None and args.rankclip_ramp_epochs < 0:
        raise ValueError(f"--rankclip-ramp-epochs must be >= 0, got {args.rankclip_ramp_epochs}.")
    from .registry import family_for_model_name
    family = family_for_model_name(getattr(args, 'model', None))
    if family is not None or args.csv_dataset_sample_type != 'default':
        raise ValueError(f"--loss-opt rankclip pretrains plain CLIP models on image-caption data; "
                         f"not {args.model} / --csv-dataset-sample-type {args.csv_dataset_sample_type}.")
    for flag, on in (('--siglip', getattr(args, 'siglip', False)), ('--distill-model', getattr(args, 'distill_model', None)),
                     ('a CoCa model', 'coca' in str(getattr(args, 'model', '')).lower())):
        if on:
            raise ValueError(f"--loss-opt rankclip replaces CLIP's contrastive loss and cannot be combined "
                             f"with {flag}.")


def validate_global_pairs_args(args, loss):
    """``--rank-global-pairs`` works with the pair losses on rank data, one step per batch, torch.distributed."""
    if not getattr(args, 'rank_global_pairs', False):
        return
    if args.csv_dataset_sample_type != 'rank' or loss not in ('dual-head', 'single-head'):
        raise ValueError(f"--rank-global-pairs forms pairs of the dual-head / single-head loss over all processes: "
                         f"it needs --csv-dataset-sample-type rank and one of those losses (got "
                         f"--csv-dataset-sample-type {args.csv_dataset_sample_type}, loss {loss}).")
    if getattr(args, 'accum_freq', 1) > 1:
        raise ValueError("--rank-global-pairs does not support --accum-freq > 1 (pairs would have to span the "
                         "accumulated micro-batches of every process); use --accum-freq 1.")
    if getattr(args, 'horovod', False):
        raise ValueError("--rank-global-pairs gathers with torch.distributed; it does not support --horovod.")
    if getattr(args, 'dataset_type', 'csv') == 'webdataset' or str(args.train_data or '').endswith('.tar'):
        raise ValueError("--rank-global-pairs needs the same category on every process at each step, which streamed "
                         "shards do not give; use --dataset-type csv rank data.")


def validate_feature_cache_args(args):
    """``--rank-feature-cache`` caches what ``--lock-image`` freezes, on CSV rank data; refuse what would make a
    cached output differ from the tower's."""
    if not getattr(args, 'rank_feature_cache', None):
        return
    why = None
    if args.csv_dataset_sample_type != 'rank':
        why = f"it needs --csv-dataset-sample-type rank (got {args.csv_dataset_sample_type})"
    elif not getattr(args, 'lock_image', False):
        why = "it needs a frozen image tower: add --lock-image"
    elif getattr(args, 'lock_image_unlocked_groups', 0) > 0:
        why = "--lock-image-unlocked-groups > 0 trains part of the image tower"
    elif getattr(args, 'dataset_type', 'csv') == 'webdataset' or str(args.train_data or '').endswith('.tar'):
        why = "it keys images by CSV row; streamed shards are not supported (use --dataset-type csv)"
    elif getattr(args, 'force_patch_dropout', None) and not getattr(args, 'lock_image_eval', False):
        why = "--force-patch-dropout drops tokens at random (add --lock-image-eval: the locked tower then runs " \
              "without it)"
    if why:
        raise ValueError(f"--rank-feature-cache: {why}.")


def validate_lock_image_eval_args(args):
    if not getattr(args, 'lock_image_eval', False):
        return
    from .registry import family_for_model_name
    family = family_for_model_name(getattr(args, 'model', None))
    if family is None or family.name != 'adapter':
        raise ValueError(f"--lock-image-eval is for adapter models (*-adapter configs), not {args.model}.")
    if not getattr(args, 'lock_image', False) or getattr(args, 'lock_image_unlocked_groups', 0) > 0:
        raise ValueError("--lock-image-eval runs a fully locked image tower in eval mode: add --lock-image "
                         "(without --lock-image-unlocked-groups).")


def plugin_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, prog='open_clip_rank')
    return add_plugin_args(parser)


def validate_plugin_args(args):
    """Clear one-line errors for bad flag combinations, before anything is built."""
    if args.csv_dataset_sample_type == 'rank':
        if not 0.0 <= args.negative_ratio < 1.0:
            raise ValueError(f"--negative-ratio must be in [0, 1), got {args.negative_ratio}.")
        if args.dataset_type not in ('csv', 'auto', 'webdataset'):
            raise ValueError(f"--csv-dataset-sample-type rank needs --dataset-type csv or webdataset, "
                             f"got {args.dataset_type}.")
        if args.train_with_relevance_score and args.relevance_max_score < 1:
            raise ValueError(f"--relevance-max-score must be >= 1, got {args.relevance_max_score}.")
        # A rank model uses the same parameters every step (e.g. never the pair head with single-head
        # loss): DDP's static graph handles such unused parameters without find_unused_parameters.
        args.ddp_static_graph = True
    if args.train_with_relevance_score and args.csv_dataset_sample_type != 'rank':
        raise ValueError("--train-with-relevance-score re-words rank batches: add --csv-dataset-sample-type rank.")
    if args.csv_dataset_sample_type == 'ordinal':
        if args.dataset_type not in ('csv', 'auto', 'webdataset'):
            raise ValueError(f"--csv-dataset-sample-type ordinal needs --dataset-type csv or webdataset, "
                             f"got {args.dataset_type}.")
        if args.ordinal_ce_weight < 0 or args.ordinal_kl_weight < 0 or \
                args.ordinal_ce_weight + args.ordinal_kl_weight == 0:
            raise ValueError("--ordinal-ce-weight and --ordinal-kl-weight must be >= 0, not both 0.")
    loss = resolved_loss_name(args)
    needed = LOSS_SAMPLE_TYPES.get(loss)
    if needed and args.train_data and args.csv_dataset_sample_type != needed:
        given = f"--loss-opt {loss}" if args.loss_opt else f"--model {args.model} (default loss {loss})"
        raise ValueError(f"{given} trains on targets: add --dataset-type csv "
                         f"--csv-dataset-sample-type {needed} (CSV with a '{args.csv_value_key}' column).")
    validate_global_pairs_args(args, loss)
    validate_feature_cache_args(args)
    validate_lock_image_eval_args(args)
    validate_rankclip_args(args)
    from .models.adapter import set_tower_lock_policy
    # read by the adapter models' lock_*_tower
    set_tower_lock_policy(strict=args.strict_tower_lock, image_eval=args.lock_image_eval)
    return args


def wrap_parse_args(original):
    def parse_args(args):
        args = sys.argv[1:] if args is None else list(args)
        parser = plugin_parser()
        plugin_args, rest = parser.parse_known_args(args)
        try:
            parsed = original(rest)
        except SystemExit as exit_:
            if exit_.code == 0 and ('-h' in rest or '--help' in rest):
                print()
                parser.print_help()
            raise
        for key, value in vars(plugin_args).items():
            setattr(parsed, key, value)
        try:
            return validate_plugin_args(parsed)
        except ValueError as err:
            parser.error(str(err))

    return parse_args
