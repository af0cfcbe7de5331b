"""Image tokens and pooled features from each kind of OpenCLIP image tower, through public methods.

What a rank head sees per image (as the original adapter): ViT patch tokens after ``ln_post``, through
``proj``; ModifiedResNet's layer-4 map (before the attention pool); a timm trunk's un-pooled map
(``timm_pool: ""``). Maps become [N, h*w, D] token sequences.
"""
import torch

from open_clip.modified_resnet import ModifiedResNet
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer


def _map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2) if x.ndim == 4 else x  # [N, D, h, w] -> [N, h*w, D]


def emit_tokens(visual) -> None:
    """A ViT built by a rank model returns (pooled, tokens); other towers need no switch."""
    if isinstance(visual, VisionTransformer):
        visual.output_tokens = True


def image_tokens(visual, image: torch.Tensor, map_proj=None) -> torch.Tensor:
    """[N, P, D] tokens of ``image`` from the tower ``visual``; ``map_proj`` (e.g. a 1x1 conv) maps a
    ResNet's layer-4 channels to the token width first."""
    if isinstance(visual, VisionTransformer):
        _, tokens = visual(image)  # one pass: post-ln_post patch tokens
        return tokens @ visual.proj if visual.proj is not None else tokens
    if isinstance(visual, ModifiedResNet):
        x = visual.forward_intermediates(image, indices=1, intermediates_only=True)['image_intermediates'][-1]
        return _map_to_tokens(map_proj(x) if map_proj is not None else x)
    if isinstance(visual, TimmModel):
        return _map_to_tokens(visual(image))
    raise TypeError(f"{type(visual).__name__} image towers are not supported by open_clip_rank models.")


def pooled_image_features(visual, image: torch.Tensor) -> torch.Tensor:
    """OpenCLIP's pooled image embedding [N, E] from a tower configured to keep its tokens.

    ViT: the pooled (class) token @ proj; ResNet: the attention pool; a timm trunk without pooling
    (the rank configs' ``timm_pool: ""``): the mean of its output map, the global average pool.
    """
    features = visual(image)
    if isinstance(features, tuple):  # ViT with output_tokens: (pooled, tokens)
        features = features[0]
    if features.ndim == 4:
        features = features.mean(dim=(2, 3))
    return features
