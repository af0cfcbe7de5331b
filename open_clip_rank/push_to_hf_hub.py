"""Share a trained model on the Hugging Face Hub: ``python -m open_clip_rank.push_to_hf_hub``.

OpenCLIP 3.3's own ``python -m open_clip.push_to_hf_hub`` cannot run with the huggingface_hub its install brings
(2.x removed ``repo_type_and_id_from_hf_id``, which it imports, so every push dies with a NameError), and it fetches
an HF copy of the CLIP tokenizer over the network even for models whose tokenizer ships with OpenCLIP. This command
takes OpenCLIP's flags (``--model --pretrained --repo-id --precision --image-mean --image-std
--image-interpolation --image-resize-mode --hf-tokenizer-self``), writes the folder (``hub/folder.py``, with the
training run's flags from ``hub/run_folder.py`` and a model card from ``hub/card.py``) and pushes it with
huggingface_hub's current API. ``--local-dir DIR`` writes the folder without pushing (for ``hf upload``, or to look
first).

Everything family-specific comes from the registry; this module never names a family.
"""
import argparse
import copy
import logging
import os
import sys
import tempfile
from typing import Optional

from . import registry
from .integration.compat import read_model_config_file
from .hub.card import _card_facts, model_card
from .hub.folder import PRECISIONS, README, build_pushable, check_round_trip, save_for_hf, \
    write_local_dir
from .hub.run_folder import checkpoint_epoch, read_params, run_folder_of

_logger = logging.getLogger(__name__)

PROG = 'python -m open_clip_rank.push_to_hf_hub'


# --- pushing ------------------------------------------------------------------------------------------------

def push_to_hf_hub(model, tokenizer, model_config: dict, repo_id: str, commit_message: str = 'Add model',
                   token: Optional[str] = None, revision: Optional[str] = None, private: bool = False,
                   create_pr: bool = False, readme: Optional[str] = None, replace_readme: bool = False,
                   safe_serialization='both', check_precision: Optional[str] = 'fp32'):
    """OpenCLIP's ``push_to_hf_hub`` on huggingface_hub's current API (``HfApi.create_repo`` / ``upload_folder``):
    the folder ``save_for_hf`` writes, checked by loading it back (``check_precision``: the precision to load it
    at; None skips the check). An existing ``README.md`` in the repo is kept, as OpenCLIP does, unless
    ``replace_readme``. Returns huggingface_hub's commit info."""
    from huggingface_hub import HfApi
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if readme is not None and not replace_readme and api.file_exists(repo_id, README, revision=revision):
        _logger.warning(f"{repo_id} already has a {README}: kept (it may describe other weights); --replace-card "
                        f"writes this push's card.")
        readme = None
    with tempfile.TemporaryDirectory(prefix='open_clip_rank_push_') as folder:
        save_for_hf(model, tokenizer, model_config, folder, safe_serialization=safe_serialization, readme=readme)
        if check_precision is not None:
            check_round_trip(folder, model, tokenizer, check_precision)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, create_pr=create_pr,
                                 commit_message=commit_message)


# --- the command --------------------------------------------------------------------------------------------

def build_parser():
    registry.load_plugins()
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    mdl = p.add_argument_group('model (OpenCLIP\'s push flags; --model or --config-path, default: the run\'s --model)')
    mdl.add_argument('--model', type=str, default=None, help='OpenCLIP model name (built-in, local-dir:, hf-hub:).')
    mdl.add_argument('--config-path', type=str, default=None,
                     help='Model config JSON (e.g. a run\'s logs/<name>/config.json, the official model-config.json).')
    mdl.add_argument('--pretrained', '--checkpoint-path', dest='pretrained', type=str, default=None,
                     help='Checkpoint file (a run\'s logs/<name>/checkpoints/epoch_N.pt: its params.txt and '
                          'results.jsonl feed the config and the card) or an OpenCLIP pretrained tag. Default: the '
                          'weights of a local-dir: / hf-hub: model.')
    mdl.add_argument('--precision', type=str, default='fp32', choices=PRECISIONS, help='Dtype of the weights written.')
    mdl.add_argument('--image-mean', type=float, nargs='+', default=None, metavar='MEAN',
                     help='Override the image mean (default: the run\'s --image-mean, else the model\'s).')
    mdl.add_argument('--image-std', type=float, nargs='+', default=None, metavar='STD',
                     help='Override the image std (default: the run\'s --image-std, else the model\'s).')
    mdl.add_argument('--image-interpolation', type=str, default=None, choices=['bicubic', 'bilinear', 'random'],
                     help='Image resize interpolation written to the config (not for families that resize '
                          'without cropping: theirs is fixed).')
    mdl.add_argument('--image-resize-mode', type=str, default=None, choices=['shortest', 'longest', 'squash'],
                     help='Image resize mode written to the config (not for families that resize without cropping).')
    mdl.add_argument('--hf-tokenizer-self', action='store_true',
                     help='Point the config\'s hf_tokenizer_name at the pushed repo (Hugging Face tokenizers only; '
                          'OpenCLIP\'s built-in tokenizer needs no files).')
    dst = p.add_argument_group('destination (--repo-id and/or --local-dir)')
    dst.add_argument('--repo-id', type=str, default=None, help='Hub repo, ORG/NAME.')
    dst.add_argument('--local-dir', type=str, default=None,
                     help='Write the folder here instead of pushing (then e.g. hf upload ORG/NAME DIR).')
    dst.add_argument('--private', action='store_true', help='Create the repo private.')
    dst.add_argument('--revision', type=str, default=None, help='Branch to push to.')
    dst.add_argument('--create-pr', action='store_true', help='Push as a pull request.')
    dst.add_argument('--commit-message', type=str, default='Add model')
    dst.add_argument('--replace-card', action='store_true',
                     help='Replace the repo\'s README.md (default: an existing one is kept, as OpenCLIP does).')
    dst.add_argument('--no-check', action='store_true',
                     help='Skip loading the written folder back and comparing it with the model.')
    card = p.add_argument_group('model card (README.md)')
    card.add_argument('--instructions', action='append', default=None, metavar='TEXT',
                      help='An instruction the model was trained on (repeat). Default: the training data\'s.')
    card.add_argument('--categories', action='append', default=None, metavar='WORD',
                      help='A category the model was trained on (repeat). Default: the training data\'s.')
    card.add_argument('--train-data', type=str, default=None,
                      help='Training file to read instructions, categories and target range from, in the format of '
                           'the model\'s data. Default: the run\'s --train-data, where it exists here.')
    card.add_argument('--dataset-name', type=str, default=None, help='Name of the training dataset (card metadata).')
    card.add_argument('--metrics', type=str, default=None,
                      help='results.jsonl (the pushed epoch\'s record), a JSON object of metrics or the rank CLI\'s '
                           'output JSON. Default: the run\'s results.jsonl.')
    card.add_argument('--base-pretrained', type=str, default=None,
                      help='OpenCLIP pretrained tag training started from. Default: the run\'s --pretrained.')
    card.add_argument('--license', type=str, default='mit', help='License in the card metadata (OpenCLIP\'s default).')
    card.add_argument('--description', type=str, default=None, help='Replaces the card\'s opening paragraph.')
    return p


IMAGE_FLAGS = ('image_mean', 'image_std', 'image_interpolation', 'image_resize_mode')


def _preflight(args, model_name) -> None:
    """The flags alone, before the model is built: one line each (ValueError)."""
    from .integration.compat import read_model_config
    if args.pretrained and os.path.isdir(args.pretrained):
        raise ValueError(f"--pretrained {args.pretrained} is a folder: give a checkpoint file (a run's "
                         f"checkpoints/epoch_N.pt) or a pretrained tag.")
    if not args.repo_id and not args.local_dir:
        raise ValueError("give --repo-id ORG/NAME to push, or --local-dir DIR to write the folder only.")
    if args.repo_id and args.repo_id.count('/') != 1:
        raise ValueError(f"--repo-id {args.repo_id}: a Hub repo id is ORG/NAME.")
    if args.hf_tokenizer_self and not args.repo_id:
        raise ValueError("--hf-tokenizer-self points the config at the pushed repo: give --repo-id ORG/NAME.")
    config = read_model_config_file(args.config_path) if args.config_path else (
        read_model_config(model_name) if model_name else None)
    family = registry.family_for_config(config)
    if family is not None and family.square_resize and (args.image_interpolation or args.image_resize_mode):
        raise ValueError(f"{family.name} models are resized to the square input without cropping (bicubic), as in "
                         f"training: --image-interpolation / --image-resize-mode do not apply.")


def push_command(args) -> int:
    is_file = bool(args.pretrained) and os.path.isfile(args.pretrained)
    run = run_folder_of(args.pretrained) if is_file else None
    params = read_params(run / 'params.txt') if run is not None and (run / 'params.txt').is_file() else {}
    model_name = args.model
    if model_name is None and args.config_path is None and params.get('model'):
        model_name = params['model']
        _logger.info(f"--model {model_name}: the training run's (params.txt)")
    _preflight(args, model_name)
    # the run's image flags where none is given (a family that resizes without cropping ignores them, as training)
    preprocess = {flag: getattr(args, flag) if getattr(args, flag) is not None else params.get(flag)
                  for flag in IMAGE_FLAGS}
    pushable = build_pushable(model_name, args.config_path, args.pretrained, args.precision, run_params=params,
                              **preprocess)
    if args.hf_tokenizer_self and not hasattr(pushable.tokenizer, 'save_pretrained'):
        raise ValueError("--hf-tokenizer-self points the config at tokenizer files in the repo; this model uses "
                         "OpenCLIP's built-in tokenizer, which needs none: leave it out.")
    config = pushable.model_config
    if args.hf_tokenizer_self:
        config = copy.deepcopy(config)
        config.setdefault('text_cfg', {})['hf_tokenizer_name'] = args.repo_id
    epoch = checkpoint_epoch(args.pretrained) if is_file else None
    readme = model_card(pushable.model, config, _card_facts(args, pushable, run, params, epoch))
    check = None if args.no_check else args.precision
    if args.local_dir:
        written = write_local_dir(pushable.model, pushable.tokenizer, config, args.local_dir, readme=readme,
                                  check_precision=check)
        print(f"wrote {args.local_dir}: {', '.join(written)}")
        if args.repo_id:
            print(f"push it with: hf upload {args.repo_id} {args.local_dir}")
        return 0
    try:
        info = push_to_hf_hub(pushable.model, pushable.tokenizer, config, args.repo_id,
                              commit_message=args.commit_message, revision=args.revision, private=args.private,
                              create_pr=args.create_pr, readme=readme, replace_readme=args.replace_card,
                              check_precision=check)
    except OSError as err:  # huggingface_hub's HTTP and offline errors: the Hub refused or cannot be reached
        first = str(err).strip().splitlines()[0] if str(err).strip() else ''
        print(f"open_clip_rank.push_to_hf_hub: error: the push to {args.repo_id} failed ({type(err).__name__}: "
              f"{first}); log in with hf auth login (or set HF_TOKEN), or write the folder with --local-dir and "
              f"upload it later (hf upload).", file=sys.stderr)
        return 1
    print(f"pushed {pushable.name} to {args.repo_id}: {getattr(info, 'commit_url', info)}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s | %(levelname)s | %(message)s')
    from .integration.compat import quiet_torch_loggers
    quiet_torch_loggers()
    try:
        return push_command(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"open_clip_rank.push_to_hf_hub: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
