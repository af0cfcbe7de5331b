"""RankCLIP (--loss-opt rankclip): parity with the released get_loss, ListMLE, ramp, accumulation, flags."""
from types import SimpleNamespace

import pytest
import torch

import open_clip
import open_clip_train.train
from open_clip_rank.integration import compat
from open_clip_rank.losses import create_loss
from open_clip_rank.registry import LOSSES
from open_clip_rank.losses.listmle import list_mle, tie_permutation
from open_clip_rank.losses.rankclip import RankCLIPLoss, ramp_weight
from helpers import fixture_path

pytestmark = pytest.mark.unit


def reference_list_mle(scores, targets, permutation, eps=1e-10):
    """The released definition written out directly, in float64: shuffle the columns, sort by the targets
    (ties in shuffled order), log of the tail sums of exp(score - row max) plus eps, minus the score."""
    scores, targets = scores.double()[:, permutation], targets.double()[:, permutation]
    ranked = scores.gather(1, targets.sort(dim=1, descending=True, stable=True).indices)
    shifted = ranked - ranked.max(dim=1, keepdim=True).values
    tails = shifted.exp().flip(1).cumsum(1).flip(1)
    return (torch.log(tails + eps) - shifted).sum(1).mean()


def features(n=8, d=16, seed=0, duplicates=True):
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(n, d, generator=generator)
    text = image + 0.8 * torch.randn(n, d, generator=generator)
    if duplicates:  # repeated images and captions: exact ties in the ranking targets
        image[1] = image[0]
        text[3] = text[2]
        text[5] = text[4]
    return torch.nn.functional.normalize(image, dim=-1), torch.nn.functional.normalize(text, dim=-1)


@pytest.mark.parametrize('epoch', [1, 4, 10])
def test_fixture_parity_with_the_released_get_loss(epoch):
    reference = torch.load(fixture_path('reference_rankclip_loss.pt'), weights_only=False)
    case = reference['cases'][f'epoch{epoch}_of_10']
    loss = RankCLIPLoss(seed=0)
    loss.set_epoch(epoch, 10)
    out = loss(reference['image_embeds'], reference['text_embeds'], reference['logit_scale_param'].exp(),
               output_dict=True)
    assert set(out) == {'contrastive_loss', 'crossmodal_rank_loss', 'inmodal_rank_loss'}
    rank = out['crossmodal_rank_loss'] + out['inmodal_rank_loss']
    torch.testing.assert_close(out['contrastive_loss'], case['contrastive_loss'], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rank, case['rank_loss'], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sum(out.values()), case['loss'], atol=1e-5, rtol=1e-5)


def test_list_mle_matches_the_released_definition_at_logit_scale_100_with_ties():
    image, text = features(n=24, d=8)
    scores = (100 * image @ text.T).requires_grad_()
    targets = (100 * text @ image.T).round()  # many ties
    permutation = tie_permutation(24, (0, 1, 2, 3))
    ours = list_mle(scores, targets, permutation)
    (grad,) = torch.autograd.grad(ours, scores)
    reference = reference_list_mle(scores, targets, permutation)
    (reference_grad,) = torch.autograd.grad(reference, scores)
    torch.testing.assert_close(ours.double(), reference, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-5, atol=1e-7)
    # the rows span far more than 23 nats, so the eps floor changes the value: it is part of the definition
    span = (scores.max(1).values - scores.min(1).values).min()
    assert span > 23
    assert abs(reference_list_mle(scores, targets, permutation, eps=0.0) - reference) > 1e-3
    # the tie order decides the value: another permutation gives another loss
    other = tie_permutation(24, (0, 1, 2, 4))
    assert not torch.equal(other, permutation)
    assert abs(list_mle(scores, targets, other) - ours) > 1e-4


def test_tie_permutation_is_seeded_not_global_rng():
    torch.manual_seed(1)
    first = tie_permutation(50, (7, 3, 11, 0))
    torch.manual_seed(2)
    torch.rand(100)
    assert torch.equal(first, tie_permutation(50, (7, 3, 11, 0)))
    assert sorted(first.tolist()) == list(range(50))


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_finite_under_autocast_at_logit_scale_100(dtype):
    image, text = features(n=32, d=16, seed=3)
    image.requires_grad_()
    text.requires_grad_()
    scale = torch.tensor(100.0, requires_grad=True)
    loss = RankCLIPLoss()
    loss.set_epoch(10, 10)
    with torch.autocast('cpu', dtype=dtype):
        out = loss(image.to(dtype), text.to(dtype), scale, output_dict=True)
        total = sum(out.values())
    total.backward()
    assert out['crossmodal_rank_loss'] > 0 and out['inmodal_rank_loss'] > 0
    assert torch.isfinite(total)
    for grad in (image.grad, text.grad, scale.grad):
        assert torch.isfinite(grad).all()
    assert image.grad.abs().sum() > 0


def test_ramp_matches_the_original_and_handles_one_epoch():
    for epochs in (2, 5, 10, 64):
        for epoch in range(1, epochs + 1):
            original = min(2.0, max(0.0, 3.0 * (epoch - 1) / (epochs - 1)))
            assert ramp_weight(epoch, epochs) == pytest.approx(original)
    assert ramp_weight(1, 1) == 2.0  # no room for a ramp: the peak, no division by zero
    assert ramp_weight(1, 10, ramp_epochs=0) == 2.0  # ramp off
    assert ramp_weight(3, 10, peak=1.0, ramp_epochs=4) == pytest.approx(0.5)
    assert ramp_weight(12, 10, peak=1.0, ramp_epochs=4) == 1.0


def test_train_one_epoch_tells_the_loss_openclips_epoch():
    """OpenCLIP's train_one_epoch gets a 0-based epoch: epoch 0 of 10 is RankCLIP's epoch 1 (weight 0)."""
    assert compat.is_patched(open_clip_train.train.train_one_epoch)
    import open_clip_train.main as main  # main's from-import bound the dispatch
    assert compat.is_patched(main.train_one_epoch)
    import open_clip_rank.integration.hook as hook
    seen = []

    def fake_original(model, data, loss, epoch, *rest, tb_writer=None):
        seen.append((epoch, loss.rank_weight))

    module = SimpleNamespace(__name__='open_clip_train.train', train_one_epoch=fake_original)
    hook._patch_train_one_epoch(module)
    scalars = []
    writer = SimpleNamespace(add_scalar=lambda *a: scalars.append(a))
    data = {'train': SimpleNamespace(dataloader=SimpleNamespace(num_batches=6))}
    args = SimpleNamespace(epochs=10, rank=0, accum_freq=2)
    loss = RankCLIPLoss()
    for epoch in (0, 3, 9):
        module.train_one_epoch(None, data, loss, epoch, None, None, None, None, args, tb_writer=writer)
    assert seen == [(0, 0.0), (3, 1.0), (9, 2.0)]
    assert scalars == [('train/rankclip_rank_weight', 0.0, 0), ('train/rankclip_rank_weight', 1.0, 9),
                       ('train/rankclip_rank_weight', 2.0, 27)]
    assert compat.is_patched(module.train_one_epoch)


def test_weights_switch_terms_off_and_scale_them():
    image, text = features()
    scale = torch.tensor(20.0)
    full = RankCLIPLoss()(image, text, scale, output_dict=True)
    cross_only = RankCLIPLoss(inmodal_weight=0)(image, text, scale, output_dict=True)
    assert set(cross_only) == {'contrastive_loss', 'crossmodal_rank_loss'}
    torch.testing.assert_close(cross_only['crossmodal_rank_loss'], full['crossmodal_rank_loss'])
    half_in = RankCLIPLoss(crossmodal_weight=0, inmodal_weight=0.5)(image, text, scale, output_dict=True)
    assert set(half_in) == {'contrastive_loss', 'inmodal_rank_loss'}
    torch.testing.assert_close(half_in['inmodal_rank_loss'], full['inmodal_rank_loss'] / 2)
    plain = RankCLIPLoss(crossmodal_weight=0, inmodal_weight=0)(image, text, scale)
    torch.testing.assert_close(plain, open_clip.ClipLoss()(image, text, scale))  # OpenCLIP's contrastive loss


def test_accumulation_gradient_equals_the_full_batch_gradient():
    """OpenCLIP's --accum-freq path: each micro-batch's live features among the cached others, one backward
    per micro-batch; all accum_freq calls of a step share the tie permutations, so the summed gradients are
    the gradient of one full-batch loss (the batch has ties, so differing permutations would show)."""
    image, text = features(n=12, d=8, seed=5)
    scale = torch.tensor(100.0)
    full_image, full_text = image.clone().requires_grad_(), text.clone().requires_grad_()
    reference = RankCLIPLoss(seed=3, accum_freq=3)
    reference.set_epoch(10, 10)
    reference(full_image, full_text, scale).backward()

    accumulated = RankCLIPLoss(seed=3, accum_freq=3)
    accumulated.set_epoch(10, 10)
    live_image, live_text = image.clone().requires_grad_(), text.clone().requires_grad_()
    chunks = [slice(0, 4), slice(4, 8), slice(8, 12)]
    for j, chunk in enumerate(chunks):
        parts_i = [image[c] if k != j else live_image[c] for k, c in enumerate(chunks)]
        parts_t = [text[c] if k != j else live_text[c] for k, c in enumerate(chunks)]
        accumulated(torch.cat(parts_i), torch.cat(parts_t), scale).backward()
    torch.testing.assert_close(live_image.grad, full_image.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(live_text.grad, full_text.grad, rtol=1e-5, atol=1e-7)
    # the next step draws new permutations
    assert accumulated._calls // accumulated.accum_freq == 1


def _args(**overrides):
    import open_clip_train.params
    argv = ['--model', 'tiny-vit', '--train-data', 'x.csv', '--loss-opt', 'rankclip']
    for key, value in overrides.items():
        argv += [f'--{key}'] + ([] if value is True else [str(value)])
    return open_clip_train.params.parse_args(argv)


def test_flags_build_the_loss_on_plain_models_and_ordinary_data():
    args = _args(**{'rankclip-inmodal-weight': 0.5, 'rankclip-ramp-peak': 1.5, 'rankclip-ramp-epochs': 3,
                    'local-loss': True, 'gather-with-grad': True, 'seed': 7, 'accum-freq': 2})
    assert args.csv_dataset_sample_type == 'default'  # ordinary image-caption data, no rank CSV needed
    args.rank, args.world_size, args.horovod = 1, 4, False
    loss = create_loss(args)
    assert isinstance(loss, RankCLIPLoss) and 'rankclip' in LOSSES
    assert (loss.inmodal_weight, loss.crossmodal_weight, loss.ramp_peak, loss.ramp_epochs) == (0.5, 1.0, 1.5, 3.0)
    assert (loss.local_loss, loss.gather_with_grad, loss.rank, loss.world_size) == (True, True, 1, 4)
    assert (loss.seed, loss.accum_freq) == (7, 2)
    assert open_clip.create_loss(args) is not None and isinstance(open_clip.create_loss(args), RankCLIPLoss)


@pytest.mark.parametrize('overrides, message', [
    ({'rankclip-inmodal-weight': -1}, '--rankclip-inmodal-weight must be >= 0'),
    ({'rankclip-ramp-epochs': -2}, '--rankclip-ramp-epochs must be >= 0'),
    ({'siglip': True}, 'cannot be combined with --siglip'),
    ({'model': 'tiny-vit-adapter'}, 'pretrains plain CLIP models'),
])
def test_bad_rankclip_flags_are_one_line_usage_errors(overrides, message, capsys):
    with pytest.raises(SystemExit) as info:
        _args(**overrides)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_inmodal_augmentation_is_not_offered(capsys):
    """The original's --inmodal mode is not implemented (README): its flag is an unknown argument, no stub."""
    with pytest.raises(SystemExit) as info:
        _args(**{'rankclip-inmodal-augment': True})
    assert info.value.code == 2
    assert 'unrecognized arguments: --rankclip-inmodal-augment' in capsys.readouterr().err


def test_a_custom_text_clip_trains_with_the_loss(tmp_path):
    """CustomTextCLIP configs (a separate ``text`` tower, as SigLIP / HF-text models) pretrain as CLIP does."""
    import json
    from helpers import TEST_CONFIG_DIR
    cfg = json.loads((TEST_CONFIG_DIR / 'tiny-customtext-adapter.json').read_text())
    for key in ('adapter_cfg', 'misc_cfg', 'init_logit_bias'):  # the adapter's and SigLIP's parts
        cfg.pop(key, None)
    for tower in ('vision_cfg', 'text_cfg'):  # pooled features, as a plain model's towers give
        cfg[tower].pop('output_tokens')
    (tmp_path / 'tiny-customtext.json').write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)
    args = _args(model='tiny-customtext')
    args.rank, args.world_size, args.horovod = 0, 1, False
    loss = create_loss(args)
    loss.start_epoch(5, args)  # past the ramp's start: the rank terms count
    torch.manual_seed(0)
    model = open_clip.create_model('tiny-customtext', output_dict=True)
    assert type(model).__name__ == 'CustomTextCLIP'
    out = model(torch.randn(6, 3, 32, 32), open_clip.get_tokenizer('tiny-customtext')(['a red circle.'] * 3 +
                                                                                       ['a blue square.'] * 3))
    losses = loss(**out, output_dict=True)
    assert set(losses) == {'contrastive_loss', 'crossmodal_rank_loss', 'inmodal_rank_loss'}
    assert losses['crossmodal_rank_loss'] > 0
    sum(losses.values()).backward()
    assert model.text.token_embedding.weight.grad is not None and model.visual.conv1.weight.grad is not None
