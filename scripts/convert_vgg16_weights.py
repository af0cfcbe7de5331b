"""Convert VGG-16 weights in torchvision's layout to the timm ``vgg16`` the ordinal VGG configs use.

The paper's MORPH image encoder is a VGG-16 pretrained on IMDB-WIKI (the official OrdinalCLIP loads
``.cache/vgg/vgg_imdb_wiki.pth`` into its torchvision-style ``vgg16``); timm offers only ImageNet weights. This
script reads such a file (torchvision keys ``features.N.*`` and ``classifier.{0,3,6}.*``; a ``state_dict`` /
``model`` wrapper and ``module.`` / ``image_encoder.`` prefixes are accepted) and writes timm's keys:

* ``features.N.*`` unchanged (the 13 convolutions);
* ``classifier.0`` (Linear 25088 -> 4096) -> ``pre_logits.fc1``, a 7x7 convolution (the same weights, reshaped);
* ``classifier.3`` (Linear 4096 -> 4096) -> ``pre_logits.fc2``, a 1x1 convolution;
* ``classifier.6`` (the last Linear) -> ``head.fc`` when its size is the head's (``--model``'s ``embed_dim``):
  zero bias where it has none (the official last layer has no bias); another size (e.g. the 101 IMDB-WIKI ages)
  is left out, and the head keeps its initialisation.

Both networks compute the same function (tested: a random torchvision ``vgg16`` and the converted timm model agree
on an input). Usage:

    # timm keys: timm.create_model('vgg16', num_classes=C).load_state_dict(...)
    python scripts/convert_vgg16_weights.py vgg_imdb_wiki.pth vgg16_imdb_wiki_timm.pt
    # base weights for an ordinal model (keys under visual.trunk.), loaded with --pretrained FILE:
    python scripts/convert_vgg16_weights.py vgg_imdb_wiki.pth vgg16_baseline_init.pt --model vgg16-baseline-ordinal
    # ... with the text tower (and logit scale) of a CLIP checkpoint, e.g. OpenAI RN50's for vgg16-RN50-ordinal:
    python scripts/convert_vgg16_weights.py vgg_imdb_wiki.pth morph_init.pt --model vgg16-RN50-ordinal \\
        --clip-weights RN50-openai.pt

The written file holds a plain state dict; prompts (and the baseline's prototypes) start fresh when it loads.
"""
import argparse
import sys
from collections import OrderedDict
from pathlib import Path

VGG16_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)  # indices of the convolutions in features
STRIPPED_PREFIXES = ('module.', 'image_encoder.')  # DataParallel, and the official model's image encoder
TOWER_PREFIX = 'visual.trunk.'  # OpenCLIP's TimmModel holds the timm network as visual.trunk


class ConversionError(ValueError):
    """The file is not VGG-16 weights in torchvision's layout."""


def read_state_dict(path):
    import torch
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:
        raise ConversionError(f"{path} cannot be read as a torch weights file ({type(err).__name__}: {err}).")
    for key in ('state_dict', 'model'):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConversionError(f"{path} holds a {type(state).__name__}, not a state dict.")
    out = OrderedDict()
    for key, value in state.items():
        for prefix in STRIPPED_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def convert(state, head_dim=None):
    """torchvision ``vgg16`` keys -> (timm ``vgg16`` keys, notes). ``head_dim``: the timm head's size; a last layer
    of another size is left out (None: keep whatever size it has)."""
    import torch
    expected = {f'features.{i}.{kind}' for i in VGG16_CONVS for kind in ('weight', 'bias')}
    expected |= {f'classifier.{i}.{kind}' for i in (0, 3) for kind in ('weight', 'bias')}
    missing = sorted(expected - set(state))
    unknown = sorted(set(state) - expected - {'classifier.6.weight', 'classifier.6.bias'})
    if missing or unknown:
        raise ConversionError(f"not VGG-16 weights in torchvision's layout: missing {missing[:4]}, unknown "
                              f"{unknown[:4]} (VGG-16 without batch norm: features.N, classifier.0/3/6).")
    out, notes = OrderedDict(), []
    for i in VGG16_CONVS:
        for kind in ('weight', 'bias'):
            out[f'features.{i}.{kind}'] = state[f'features.{i}.{kind}']
    fc1, fc2 = state['classifier.0.weight'], state['classifier.3.weight']
    if tuple(fc1.shape) != (4096, 512 * 7 * 7) or tuple(fc2.shape) != (4096, 4096):
        raise ConversionError(f"classifier.0 / classifier.3 have shapes {tuple(fc1.shape)} / {tuple(fc2.shape)}; "
                              f"VGG-16's are (4096, 25088) / (4096, 4096).")
    out['pre_logits.fc1.weight'] = fc1.reshape(4096, 512, 7, 7)  # flatten order (C, H, W) = the conv's
    out['pre_logits.fc1.bias'] = state['classifier.0.bias']
    out['pre_logits.fc2.weight'] = fc2.reshape(4096, 4096, 1, 1)
    out['pre_logits.fc2.bias'] = state['classifier.3.bias']
    last = state.get('classifier.6.weight')
    if last is None:
        notes.append("no classifier.6 (last layer): the head keeps its initialisation.")
    elif head_dim is not None and last.shape[0] != head_dim:
        notes.append(f"classifier.6 has {last.shape[0]} outputs, the head {head_dim}: left out (the head keeps its "
                     f"initialisation).")
    else:
        out['head.fc.weight'] = last
        bias = state.get('classifier.6.bias')
        if bias is None:
            bias = torch.zeros(last.shape[0], dtype=last.dtype)
            notes.append("classifier.6 has no bias (as the official VGG): head.fc.bias set to zero.")
        out['head.fc.bias'] = bias
    return out, notes


def tower_config(model_name):
    """(embed_dim) of an ordinal model config whose image tower is timm's vgg16."""
    import open_clip_rank  # noqa: F401  (registers the plugin's model configs with OpenCLIP)
    from open_clip_rank.integration.compat import read_model_config
    cfg = read_model_config(model_name)
    if cfg is None:
        raise ConversionError(f"model {model_name} is unknown (open_clip.list_models()).")
    vision = cfg.get('vision_cfg') or {}
    if vision.get('timm_model_name') != 'vgg16' or vision.get('timm_proj') not in ('', None):
        raise ConversionError(f"model {model_name}'s image tower is not timm's vgg16 with its own head "
                              f"(vision_cfg.timm_model_name {vision.get('timm_model_name')!r}, timm_proj "
                              f"{vision.get('timm_proj')!r}).")
    return int(cfg['embed_dim'])


def with_clip_weights(tower_state, clip_state):
    """The tower under ``visual.trunk.`` plus every key of a CLIP checkpoint outside ``visual.`` (its text tower
    and logit scale)."""
    out = OrderedDict((TOWER_PREFIX + key, value) for key, value in tower_state.items())
    for key, value in clip_state.items():
        if not key.startswith('visual.'):
            out[key] = value
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('source', help="VGG-16 weights in torchvision's layout (e.g. the official vgg_imdb_wiki.pth).")
    parser.add_argument('output', help='File to write (a state dict, torch.save).')
    parser.add_argument('--model', default=None,
                        help='An ordinal model whose image tower is timm\'s vgg16 (vgg16-RN50-ordinal, '
                             'vgg16-baseline-ordinal, or your own): keys are written under visual.trunk. and the '
                             'last layer kept only if it fits the config\'s embed_dim; load with --pretrained FILE.')
    parser.add_argument('--clip-weights', default=None,
                        help='With --model: a CLIP checkpoint whose keys outside visual. (text tower, logit scale) '
                             'are added, e.g. OpenAI RN50\'s for vgg16-RN50-ordinal.')
    args = parser.parse_args(argv)
    try:
        if args.clip_weights and not args.model:
            raise ConversionError("--clip-weights adds a text tower to an ordinal model's weights: add --model.")
        head_dim = tower_config(args.model) if args.model else None
        state, notes = convert(read_state_dict(args.source), head_dim=head_dim)
        if args.model:
            clip_state = read_state_dict(args.clip_weights) if args.clip_weights else {}
            state = with_clip_weights(state, clip_state)
    except ConversionError as err:
        print(f"convert_vgg16_weights: error: {err}", file=sys.stderr)
        return 2
    import torch
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.output)
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {len(state)} tensors to {args.output}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
