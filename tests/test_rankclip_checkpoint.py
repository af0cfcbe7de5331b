"""Released RankCLIP checkpoints (OpenAI-CLIP layout, QuickGELU) load with OpenCLIP's -quickgelu configs."""
import pytest
import torch

import open_clip
from open_clip.model import build_model_from_openai_state_dict
from open_clip.transformer import QuickGELU

pytestmark = pytest.mark.unit

EMBED, WIDTH, PATCH, IMAGE, CONTEXT, VOCAB = 32, 64, 8, 32, 16, 49408


def openai_layout_state_dict(seed=0):
    """The parameter names and shapes of OpenAI's ``CLIP`` (RankCLIP's ``pkgs/openai/model.py``) for a ViT
    with one layer per tower, width 64 (one 64-wide head), written out here, random values."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=0.05):
        return scale * torch.randn(*shape, generator=generator)

    def block(prefix, width):
        return {f'{prefix}.attn.in_proj_weight': randn(3 * width, width), f'{prefix}.attn.in_proj_bias': randn(3 * width),
                f'{prefix}.attn.out_proj.weight': randn(width, width), f'{prefix}.attn.out_proj.bias': randn(width),
                f'{prefix}.ln_1.weight': 1 + randn(width), f'{prefix}.ln_1.bias': randn(width),
                f'{prefix}.mlp.c_fc.weight': randn(4 * width, width), f'{prefix}.mlp.c_fc.bias': randn(4 * width),
                f'{prefix}.mlp.c_proj.weight': randn(width, 4 * width), f'{prefix}.mlp.c_proj.bias': randn(width),
                f'{prefix}.ln_2.weight': 1 + randn(width), f'{prefix}.ln_2.bias': randn(width)}

    grid = IMAGE // PATCH
    state = {'visual.conv1.weight': randn(WIDTH, 3, PATCH, PATCH), 'visual.class_embedding': randn(WIDTH),
             'visual.positional_embedding': randn(grid * grid + 1, WIDTH),
             'visual.ln_pre.weight': 1 + randn(WIDTH), 'visual.ln_pre.bias': randn(WIDTH),
             **block('visual.transformer.resblocks.0', WIDTH),
             'visual.ln_post.weight': 1 + randn(WIDTH), 'visual.ln_post.bias': randn(WIDTH),
             'visual.proj': randn(WIDTH, EMBED),
             'positional_embedding': randn(CONTEXT, WIDTH), 'token_embedding.weight': randn(VOCAB, WIDTH),
             **block('transformer.resblocks.0', WIDTH),
             'ln_final.weight': 1 + randn(WIDTH), 'ln_final.bias': randn(WIDTH),
             'text_projection': randn(WIDTH, EMBED), 'logit_scale': torch.tensor(4.6052)}
    return state


@pytest.fixture(scope='module')
def released_checkpoint(tmp_path_factory):
    """Saved as RankCLIP's main.py saves (DDP-wrapped model: ``module.`` keys, optimizer state beside it)."""
    state = openai_layout_state_dict()
    path = tmp_path_factory.mktemp('rankclip_ckpt') / 'epoch_64.pt'
    torch.save({'epoch': 64, 'name': 'rankclip_cc3m', 'state_dict': {f'module.{k}': v for k, v in state.items()},
                'optimizer': {'state': {0: {'exp_avg': torch.zeros(3)}}, 'param_groups': [{'lr': 5e-4, 'params': [0]}]}},
               path)
    return path, state


def inputs():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, IMAGE, IMAGE, generator=generator)
    texts = torch.randint(1, 1000, (3, CONTEXT), generator=generator)
    texts[:, 0], texts[:, 5] = 49406, 49407  # start and end of text: the end token is the largest id
    texts[:, 6:] = 0
    return images, texts


def test_released_checkpoint_loads_with_the_quickgelu_config(released_checkpoint):
    path, state = released_checkpoint
    model = open_clip.create_model('tiny-vit-w64-quickgelu', pretrained=str(path))  # strict: every key used
    model.eval()
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert isinstance(model.transformer.resblocks[0].mlp.gelu, QuickGELU)
    loaded = model.state_dict()
    for key, value in state.items():
        torch.testing.assert_close(loaded[key], value, msg=key)

    # OpenCLIP's own importer of OpenAI-layout weights (what the 'openai' tag uses) infers the same model
    # from the state dict (it casts to fp16: the exact weights are loaded again in float32)
    reference = build_model_from_openai_state_dict(dict(state), quick_gelu=True, cast_dtype=None).float().eval()
    reference.load_state_dict(state)
    images, texts = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), reference.encode_image(images), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.encode_text(texts), reference.encode_text(texts), rtol=1e-5, atol=1e-6)


def test_the_config_without_quickgelu_loads_but_computes_something_else(released_checkpoint):
    """Same weights, GELU instead of QuickGELU: loads without complaint, so the -quickgelu config must be chosen."""
    path, _ = released_checkpoint
    right = open_clip.create_model('tiny-vit-w64-quickgelu', pretrained=str(path)).eval()
    wrong = open_clip.create_model('tiny-vit-w64', pretrained=str(path)).eval()
    images, texts = inputs()
    with torch.no_grad():
        assert not torch.allclose(right.encode_image(images), wrong.encode_image(images), atol=1e-4)
