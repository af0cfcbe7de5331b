"""The plugin's command-line flags, added to OpenCLIP's ``parse_args`` without copying it.

OpenCLIP builds its parser inside ``parse_args``, so there is no parser object to extend. The
wrapper first takes the plugin's own flags out of the argument list (a separate parser with
``allow_abbrev=False``, so it never swallows OpenCLIP's flags), lets OpenCLIP parse the rest, and
merges the two namespaces. ``--help`` prints OpenCLIP's help followed by the plugin's section.
"""
import argparse
import functools
import sys


def add_plugin_args(parser: argparse.ArgumentParser):
    """Flags of open_clip_rank, in OpenCLIP's style (dashes, defaults shown in help)."""
    parser.add_argument_group(
        'open_clip_rank', 'Text-driven image ranking (ranking-aware adapter models: any *-adapter model config).')
    return parser


def plugin_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, prog='open_clip_rank')
    return add_plugin_args(parser)


def validate_plugin_args(args):
    """Clear one-line errors for bad flag combinations, before anything is built."""
    return args


def wrap_parse_args(original):
    @functools.wraps(original)
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

    parse_args._open_clip_rank = True
    return parse_args
