"""The plugin's command-line flags, added to OpenCLIP's ``parse_args`` without copying it.

OpenCLIP builds its parser inside ``parse_args``, so there is no parser object to extend. The
wrapper first takes the plugin's own flags out of the argument list (a separate parser with
``allow_abbrev=False``, so it never swallows OpenCLIP's flags), lets OpenCLIP parse the rest, and
merges the two namespaces. ``--help`` prints OpenCLIP's help followed by the plugin's sections.

The flags here are the ones every family shares; each registered family, loss and sample type adds its
own (``add_args``), refuses its bad combinations (``check_args``) and sets the run policy its code reads
(``configure``), all through the registry.
"""
import argparse
import sys

from .. import registry
from ..registry import import_function


def sample_type_choices():
    """'default' (OpenCLIP's own CSV data) and every registered sample type."""
    return ('default', *registry.SAMPLE_TYPES)


def _names(entries):
    return ', '.join(entries)


def add_plugin_args(parser: argparse.ArgumentParser):
    """Flags of open_clip_rank, in OpenCLIP's style (dashes; defaults as the original code)."""
    registry.load_plugins()
    group = parser.add_argument_group(
        'open_clip_rank', f"Text-driven image ranking. Families (model-config key -> model names): "
                          f"{_names(f'{f.config_key} -> *{f.suffix}' for f in registry.FAMILIES.values())}.")
    group.add_argument(
        '--loss-opt', choices=tuple(registry.LOSSES), default=None,
        help="Loss of the plugin: " + '; '.join(
            f"'{loss.name}' ({'trains on --csv-dataset-sample-type ' + loss.sample_type if loss.sample_type else 'image-caption data'})"
            for loss in registry.LOSSES.values())
        + ". Default: the model family's loss for rank models (" + ', '.join(
            f"{f.default_loss} for *{f.suffix}" for f in registry.FAMILIES.values()) + "), OpenCLIP's loss otherwise.")
    group.add_argument(
        '--csv-dataset-sample-type', choices=sample_type_choices(), default='default',
        help="'default': OpenCLIP's image-caption data. The plugin's: " + '; '.join(
            f"'{t.name}' for {' / '.join('*' + f.suffix for f in registry.families_training_on(t.name)) or 'no built-in'} "
            f"models" for t in registry.SAMPLE_TYPES.values()) + " (docs/data.md describes each format).")
    group.add_argument('--csv-value-key', type=str, default='value', help='CSV column of the ranking target.')
    group.add_argument('--image-root', type=str, default=None,
                       help="Folder that relative image paths of the plugin's CSVs and list files (--train-data, "
                            "--val-data; every --csv-dataset-sample-type but 'default') resolve against (the "
                            "official OrdinalCLIP images_root). Default: the current directory.")
    group.add_argument('--csv-relative-paths', action='store_true', default=False,
                       help="Relative image paths of the plugin's CSVs and list files resolve against the folder of "
                            "the file that lists them (as the original RankCLIP reads its CSVs) instead of the "
                            "current directory. Not with --image-root.")
    group.add_argument('--load-truncated-images', action='store_true', default=False,
                       help="Decode truncated image files with what they hold (as the original RankingAwareCLIP "
                            "code sets PIL's ImageFile.LOAD_TRUNCATED_IMAGES) instead of skipping them as "
                            "unreadable, for every --csv-dataset-sample-type: the plugin's data per image, "
                            "OpenCLIP's own loaders ('default' data, zero-shot ImageNet) through PIL's "
                            "process-wide setting. Default: off.")
    from .optimizer import add_optimizer_args
    add_optimizer_args(group)
    from .save_best import add_save_best_args
    add_save_best_args(group)
    for hook in registry.all_hooks('add_args'):
        import_function(hook)(parser)
    return parser


def plugin_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, prog='open_clip_rank')
    return add_plugin_args(parser)


def check_plugin_args(args) -> None:
    """Clear one-line errors (ValueError) for bad flag combinations, before anything is built; changes nothing."""
    sample_type = args.csv_dataset_sample_type
    if sample_type != 'default' and getattr(args, 'dataset_type', 'csv') not in ('csv', 'auto', 'webdataset'):
        raise ValueError(f"--csv-dataset-sample-type {sample_type} needs --dataset-type csv or webdataset, "
                         f"got {args.dataset_type}.")
    loss = registry.resolved_loss(args)
    if loss is not None and loss.sample_type and args.train_data and args.csv_dataset_sample_type != loss.sample_type:
        given = f"--loss-opt {loss.name}" if args.loss_opt else f"--model {args.model} (default loss {loss.name})"
        raise ValueError(f"{given} trains on targets: add --dataset-type csv "
                         f"--csv-dataset-sample-type {loss.sample_type} (CSV with a '{args.csv_value_key}' column).")
    image_root, relative = getattr(args, 'image_root', None), getattr(args, 'csv_relative_paths', False)
    if image_root and relative:
        raise ValueError("--image-root and --csv-relative-paths both say where relative image paths resolve: "
                         "give one of them.")
    path_flag = '--image-root' if image_root else '--csv-relative-paths' if relative else None
    if path_flag and sample_type == 'default':
        raise ValueError(f"{path_flag} applies to the plugin's data (--csv-dataset-sample-type "
                         f"{' / '.join(registry.SAMPLE_TYPES)}); OpenCLIP's own CSV data reads image paths as "
                         f"written: drop {path_flag} or make the paths absolute.")
    from .optimizer import check_optimizer_args
    check_optimizer_args(args)
    for hook in registry.all_hooks('check_args'):
        import_function(hook)(args)
    from .save_best import check_save_best_args
    check_save_best_args(args)  # after the sample type's and the loss's checks: it names their metrics


def configure_run(args) -> None:
    """The run policy the registered families and sample types set from checked args (e.g. the adapter's tower
    lock, DDP's static graph for rank data): read by their code later in the run. ``--load-truncated-images``
    also sets PIL's process-wide ``ImageFile.LOAD_TRUNCATED_IMAGES`` for OpenCLIP's own loaders (inherited by
    forked data workers); the plugin's datasets carry the flag themselves."""
    if getattr(args, 'load_truncated_images', False):
        from PIL import ImageFile
        ImageFile.LOAD_TRUNCATED_IMAGES = True
    from .optimizer import configure_optimizer_run
    configure_optimizer_run(args)
    for hook in registry.all_hooks('configure'):
        import_function(hook)(args)


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
            check_plugin_args(parsed)
        except ValueError as err:
            parser.error(str(err))
        configure_run(parsed)
        return parsed

    return parse_args
