"""Every shipped config builds (on the meta device): the official *-adapter configs and the *-ordinal ones."""
import json

import pytest
import torch

import open_clip
from open_clip_rank.registry import CONFIG_DIR, base_model_name, plugin_config_names

pytestmark = pytest.mark.unit

OFFICIAL_NAMES = sorted(f'{base}-adapter' for base in (
    'RN50', 'RN101', 'ViT-B-32', 'ViT-B-16', 'ViT-B-16-plus', 'ViT-L-14', 'ViT-L-14-336', 'ViT-B-16-SigLIP',
    'convnext_base', 'convnext_base_w_224', 'convnext_base_w_320', 'convnext_large_d', 'convnext_large_d_320'))


def expected_adapter_params(cfg):
    """Closed-form parameter count of the official RankAdapterV2 (mlp_ratio 4, post-fuse FFN = d)."""
    d, layers = cfg['d_model'], cfg['num_layers']
    per_layer = 30 * d * d + 38 * d  # fusion self+cross blocks (24d^2+28d) + TransformerEncoderLayer (6d^2+10d)
    return cfg['num_learnable_text_tokens'] + layers * per_layer + 9 * d * d + 30 * d + cfg['n_reg_tokens'] * d + 2


ORDINAL_NAMES = sorted(f'{base}-ordinal' for base in ('RN50', 'ViT-B-32', 'ViT-B-16', 'convnext_base_w', 'vgg16-RN50',
                                                      'RN50-baseline', 'vgg16-baseline'))


def test_all_official_configs_are_shipped_and_listed():
    assert plugin_config_names() == sorted(OFFICIAL_NAMES + ORDINAL_NAMES)
    assert set(OFFICIAL_NAMES + ORDINAL_NAMES) <= set(open_clip.list_models())


@pytest.mark.parametrize('name', OFFICIAL_NAMES)
def test_config_schema_matches_official(name):
    cfg = json.loads((CONFIG_DIR / f'{name}.json').read_text())
    assert set(cfg) <= {'embed_dim', 'vision_cfg', 'text_cfg', 'adapter_cfg', 'misc_cfg', 'custom_text',
                        'init_logit_bias', 'quick_gelu'}
    assert cfg['misc_cfg'] == {'model_version': 'clip-adapter-v2'}
    assert cfg['adapter_cfg']['adapter_attention_pooler'] == 'rank-attn'


@pytest.mark.parametrize('name', OFFICIAL_NAMES)
def test_config_builds_with_sane_parameter_count(name):
    with torch.device('meta'):
        model = open_clip.create_model(name, device='meta')
        base = open_clip.create_model(base_model_name(name), device='meta')
    cfg = open_clip.get_model_config(name)
    adapter = sum(p.numel() for p in model.adapter.parameters())
    assert adapter == expected_adapter_params(cfg['adapter_cfg'])
    total = sum(p.numel() for p in model.parameters())
    base_total = sum(p.numel() for p in base.parameters())
    # towers as in the base model, give or take a projection head (timm head / attnpool / visual_proj)
    assert abs(total - adapter - base_total) <= 0.05 * base_total, (total, adapter, base_total)
    assert 0.05 < adapter / total < 0.2


def test_siglip_adapter_uses_custom_text_tower():
    from open_clip_rank.models.adapter import RankAdapterCustomTextCLIP
    with torch.device('meta'):
        model = open_clip.create_model('ViT-B-16-SigLIP-adapter', device='meta')
    assert isinstance(model, RankAdapterCustomTextCLIP)
