"""Image tokens and pooled features from each kind of OpenCLIP image tower, through public methods.

What a rank head sees per image (as the original adapter): ViT patch tokens after ``ln_post``, through
``proj``; ModifiedResNet's layer-4 map (before the attention pool); a timm trunk's un-pooled map
(``timm_pool: ""``). Maps become [N, h*w, D] token sequences.
"""
import torch

from open_clip.modified_resnet import ModifiedResNet
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer

from ..data.feature_cache import random_in_training
from ..integration import compat

def _map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2) if x.ndim == 4 else x  # [N, D, h, w] -> [N, h*w, D]


def emit_tokens(visual) -> None:
    """A ViT built by a rank model returns (pooled, tokens); other towers need no switch."""
    if isinstance(visual, VisionTransformer):
        visual.output_tokens = True


def image_tower_features(visual, image: torch.Tensor) -> torch.Tensor:
    """The part of ``image_tokens`` that ``--lock-image`` freezes (what ``--rank-feature-cache`` stores): ViT
    tokens after ``ln_post`` (before ``proj``), a ResNet's layer-4 map, a timm trunk's output map."""
    if isinstance(visual, VisionTransformer):
        _, tokens = visual(image)  # one pass: post-ln_post patch tokens
        return tokens
    if isinstance(visual, ModifiedResNet):
        return visual.forward_intermediates(image, indices=1, intermediates_only=True)['image_intermediates'][-1]
    if isinstance(visual, TimmModel):
        return visual(image)
    raise TypeError(f"{type(visual).__name__} image towers are not supported by open_clip_rank models.")


def tokens_from_tower_features(visual, features: torch.Tensor, map_proj=None) -> torch.Tensor:
    """The rest of ``image_tokens``: a ViT's ``proj``; ``map_proj`` and flattening for maps."""
    if isinstance(visual, VisionTransformer):
        return features @ visual.proj if visual.proj is not None else features
    if isinstance(visual, ModifiedResNet):
        return _map_to_tokens(map_proj(features) if map_proj is not None else features)
    return _map_to_tokens(features)


def trainable_after_tower_features(visual):
    """Names of the tower's parameters that ``tokens_from_tower_features`` applies (a ViT's ``proj``)."""
    return ('proj',) if isinstance(visual, VisionTransformer) and visual.proj is not None else ()


def image_tokens(visual, image: torch.Tensor, map_proj=None) -> torch.Tensor:
    """[N, P, D] tokens of ``image`` from the tower ``visual``; ``map_proj`` (e.g. a 1x1 conv) maps a
    ResNet's layer-4 channels to the token width first."""
    return tokens_from_tower_features(visual, image_tower_features(visual, image), map_proj)


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


def text_token_embedding(model) -> torch.nn.Embedding:
    """The token embedding of a ``CLIP`` (on the model) or ``CustomTextCLIP`` with an OpenCLIP text tower."""
    embedding = getattr(model, 'token_embedding', None)
    if embedding is None:
        embedding = getattr(getattr(model, 'text', None), 'token_embedding', None)
    if not isinstance(embedding, torch.nn.Embedding):
        raise TypeError(f"{type(model).__name__}'s text tower has no token embedding (e.g. a Hugging Face text "
                        f"tower); learned prompts need an OpenCLIP TextTransformer text tower.")
    return embedding


def encode_text_embeddings(model, tokens: torch.Tensor, fill) -> torch.Tensor:
    """The model's own ``encode_text(tokens)``, with ``fill(embedded_tokens)`` replacing the token embeddings.

    The replacement happens in a forward hook on the tower's token embedding, so positional embedding,
    attention mask, pooling (at ``<eot>`` of ``tokens``) and projection stay exactly the tower's own.
    """
    handle = text_token_embedding(model).register_forward_hook(lambda module, args, output: fill(output))
    try:
        return model.encode_text(tokens)
    finally:
        handle.remove()


def encode_distinct_texts(encode_text_tokens, text: torch.Tensor):
    """``encode_text_tokens(text)`` once per distinct caption of the batch (a rank batch holds one instruction and
    its negatives' re-worded captions) -> (features [U, E], tokens [U, L, W], index [N] naming each row's caption,
    or None when every caption differs and U = N). Same values and gradients as encoding every row: the gather's
    backward sums the rows' gradients into their caption's."""
    unique, index = torch.unique(text, dim=0, return_inverse=True)
    if unique.shape[0] == text.shape[0]:
        features, tokens = encode_text_tokens(text)
        return features, tokens, None
    features, tokens = encode_text_tokens(unique)
    return features, tokens, index.to(tokens.device)


def _random_in_training(module: torch.nn.Module) -> bool:
    """Any submodule in training mode whose output depends on chance or the batch (the feature cache's rule)."""
    return any(m.training and random_in_training(m) for m in module.modules())


class FrozenTextMemo:
    """Text-tower outputs kept per caption while the text tower cannot change them (``--strict-tower-lock``: a
    rank run's few instructions are then encoded once per run, not once per step).

    Used only while every text-tower parameter is frozen and nothing in it is random in training (dropout, ...); kept only while the weights are
    unchanged (their tensors' version counters: an optimizer step or ``load_state_dict`` writes them in place), on
    the same device and dtype, under the same autocast setting. Anything else: computed as usual. At most
    ``max_entries`` captions are kept (then it starts over)."""

    def __init__(self, max_entries: int = 256):
        self.max_entries = max_entries
        self._entries = {}
        self._state = None

    def _state_of(self, module: torch.nn.Module, text: torch.Tensor):
        params = list(module.parameters())
        if not params or any(p.requires_grad for p in params) or _random_in_training(module):
            return None
        device = params[0].device
        autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        return (device, params[0].dtype, autocast, text.device, tuple(compat.tensor_version(p) for p in params),
                tuple(p.data_ptr() for p in params))

    def encode(self, encode_text_tokens, text: torch.Tensor, module: torch.nn.Module):
        """``encode_text_tokens(text)`` -> (features [N, E], tokens [N, L, W]), from the memo where valid."""
        state = self._state_of(module, text)
        if state is None:
            return encode_text_tokens(text)
        if state != self._state or len(self._entries) + text.shape[0] > self.max_entries:
            self._entries, self._state = {}, state
        keys = [row.tobytes() for row in text.cpu().numpy()]
        missing = [i for i, key in enumerate(keys) if key not in self._entries]
        if missing:
            features, tokens = encode_text_tokens(text[missing])
            for i, feature, token in zip(missing, features, tokens):
                self._entries[keys[i]] = (feature, token)
        rows = [self._entries[key] for key in keys]
        return torch.stack([f for f, _ in rows]), torch.stack([t for _, t in rows])
