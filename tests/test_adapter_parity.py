"""The adapter reproduces the official L2RCLIP (fixtures from its code) for all tower families."""
import json

import pytest
import torch

import open_clip
from open_clip_rank.losses.ranking import RankingLoss
from helpers import fixture_path

pytestmark = pytest.mark.unit

FAMILIES = ['vit', 'resnet', 'convnext']
# fixtures/README.md: outputs and losses to 1e-5 relative, gradients to 1e-4
OUT_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)


def _load_fixture(family):
    return torch.load(fixture_path(f'reference_adapter_{family}.pt'), weights_only=False)


def _model_from_official_checkpoint(fixture, family, tmp_path):
    """Registers the fixture's config under a name and loads its checkpoint via pretrained=PATH."""
    name = f'reference-{family}-adapter'
    (tmp_path / f'{name}.json').write_text(json.dumps(fixture['config']))
    open_clip.add_model_config(tmp_path)
    checkpoint = tmp_path / 'official_checkpoint.pt'
    torch.save(fixture['checkpoint'], checkpoint)  # {"epoch", "name", "state_dict"} with module. keys
    model = open_clip.create_model(name, pretrained=str(checkpoint))
    return model.eval()


def _as_tokens(image_features):
    # the official model returns CNN maps [N, D, h, w]; ours returns the tokens fed to the adapter
    return image_features.flatten(2).transpose(1, 2) if image_features.ndim == 4 else image_features


def _close(actual, expected, tol):
    torch.testing.assert_close(actual, expected, **tol)


@pytest.mark.parametrize('family', FAMILIES)
def test_outputs_match_official(family, tmp_path):
    fixture = _load_fixture(family)
    model = _model_from_official_checkpoint(fixture, family, tmp_path)
    inputs, ref = fixture['inputs'], fixture['outputs']
    with torch.no_grad():
        out = model(inputs['images'], inputs['texts'], targets=inputs['targets'])
    n = inputs['images'].shape[0]
    _close(out['rank_scores'], ref['adapter_logits'].view(n), OUT_TOL)
    _close(out['pair_logits'], ref['adapter_paired_logits'].view(n, n), OUT_TOL)
    _close(out['image_tokens'], _as_tokens(ref['image_features']), OUT_TOL)
    _close(out['text_features'], ref['text_features'], OUT_TOL)
    assert torch.equal(out['targets'], inputs['targets'])
    with torch.no_grad():
        _close(model.rank_scores(inputs['images'], inputs['texts']), ref['adapter_logits'].view(n), OUT_TOL)


@pytest.mark.parametrize('family', FAMILIES)
def test_losses_and_adapter_gradients_match_official(family, tmp_path):
    fixture = _load_fixture(family)
    model = _model_from_official_checkpoint(fixture, family, tmp_path)
    inputs = fixture['inputs']
    out = model(inputs['images'], inputs['texts'], targets=inputs['targets'])
    dual = RankingLoss('dual', ['regression', 'rank'])(**out)
    single = RankingLoss('single', ['regression', 'rank'])(**out)
    _close(dual, fixture['losses']['dual_head_regression_rank'], OUT_TOL)
    _close(single, fixture['losses']['single_head_rank_regression'], OUT_TOL)

    dual.backward()
    params = dict(model.named_parameters())
    assert set(fixture['adapter_grads']) == {k for k in params if k.startswith('adapter.')}
    for key, grad in fixture['adapter_grads'].items():
        _close(params[key].grad, grad, GRAD_TOL)


@pytest.mark.parametrize('family', FAMILIES)
def test_bf16_autocast_stays_close(family, tmp_path):
    fixture = _load_fixture(family)
    model = _model_from_official_checkpoint(fixture, family, tmp_path)
    inputs, ref = fixture['inputs'], fixture['outputs']
    n = inputs['images'].shape[0]
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(inputs['images'], inputs['texts'])
    assert out['pair_logits'].shape == (n, n)
    for ours, theirs in ((out['rank_scores'], ref['adapter_logits'].view(n)),
                         (out['pair_logits'], ref['adapter_paired_logits'].view(n, n))):
        ours = ours.float()
        assert torch.isfinite(ours).all()
        scale = theirs.abs().max()
        assert (ours - theirs).abs().max() <= 0.05 * scale + 0.02, (ours, theirs)
