"""``python -m open_clip_rank``: the package's commands, one line each (each has its own ``--help``)."""
import sys

COMMANDS = (
    ('demo', 'make a counting dataset, train a small adapter model on the CPU, rank, report (the README\'s demo)'),
    ('train', 'OpenCLIP\'s training entry point with the plugin applied (as python -m open_clip_train.main)'),
    ('rank', 'rank images (a folder, or a CSV of the model\'s data) with a trained rank model; metrics with ground '
             'truth'),
    ('evaluate', 'rank every dataset of a folder of CSVs with one or more checkpoints: the rank CLI\'s metrics JSON '
                 'per checkpoint and dataset, and a summary table (summary.csv) to compare them'),
    ('select', 'keep the best-scored samples of a rank score folder (threshold / top fraction): kept keys, '
               'DataComp uids, new shards; a score-bucket picture to decide where to cut'),
    ('make_shards', 'convert training data into webdataset shards for --dataset-type webdataset'),
    ('push_to_hf_hub', 'share a trained model on the Hugging Face Hub (or write its folder with --local-dir): '
                       'weights, open_clip_config.json with the family\'s config, a model card'),
    ('prepare_datasets', 'turn a downloaded copy of one of the papers\' datasets into rank CSVs'),
)


def usage() -> str:
    width = max(len(name) for name, _ in COMMANDS)
    lines = ['open_clip_rank: text-driven image ranking for OpenCLIP. Commands:', '']
    lines += [f'  python -m open_clip_rank.{name.ljust(width)}  {what}' for name, what in COMMANDS]
    lines += ['', 'Training also runs through OpenCLIP itself: python -m open_clip_train.main --model <name>-adapter ...',
              'Docs: README.md and docs/ in the repository.']
    return '\n'.join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    print(usage())
    return 0 if not argv or argv[0] in ('-h', '--help') else 2


if __name__ == '__main__':
    sys.exit(main())
