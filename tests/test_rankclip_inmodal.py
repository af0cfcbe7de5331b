"""RankCLIP's --inmodal mode (--rankclip-inmodal): a second augmented view of every sample through OpenCLIP's own data,
contrastive = (cross-modal + in-modal) / 2 as the released get_loss computes it, the ranking lists over the originals."""
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import open_clip
from open_clip_rank.data.two_views import EDA, STOP_WORDS, TwoCaptionTokenizer, file_synonyms, views_first
from open_clip_rank.losses.listmle import list_mle_autograd
from open_clip_rank.losses.rankclip import RankCLIPLoss
from open_clip_rank.synthetic.captions import make_caption_dataset
from helpers import TEST_CONFIG_DIR, subprocess_env


def released_inmodal_loss(image, text, scale, epoch, epochs):
    """The released get_loss with options.inmodal (one process), restated: the first half of each batch are the
    samples, the second half their augmented views."""
    b = len(image) // 2
    image, image_views, text, text_views = image[:b], image[b:], text[:b], text[b:]
    per_image = scale * image @ text.T
    target = torch.arange(b)
    crossmodal = (F.cross_entropy(per_image, target) + F.cross_entropy(per_image.T, target)) / 2
    inmodal = (F.cross_entropy(scale * image @ image_views.T, target)
               + F.cross_entropy(scale * text @ text_views.T, target)) / 2
    contrastive = (crossmodal + inmodal) / 2
    weight = min(2.0, max(0.0, 3.0 * (min(epoch, epochs) - 1) / (epochs - 1)))
    identity = torch.arange(b)
    in_rank = (list_mle_autograd(scale * image @ image.T, scale * text @ text.T, identity)
               + list_mle_autograd(scale * text @ text.T, scale * image @ image.T, identity)) / 32
    cross_rank = (list_mle_autograd(per_image, per_image.T, identity)
                  + list_mle_autograd(per_image.T, per_image, identity)) / 32
    return contrastive + weight * (cross_rank / b + in_rank / b)


@pytest.mark.unit
@pytest.mark.parametrize('epoch', [1, 4, 10])
def test_loss_equals_the_released_inmodal_get_loss(epoch):
    torch.manual_seed(epoch)
    b, d = 12, 16
    image = F.normalize(torch.randn(2 * b, d, dtype=torch.float64), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(2 * b, d, dtype=torch.float64), dim=-1).requires_grad_()
    scale = torch.tensor(20.0, dtype=torch.float64)
    loss = RankCLIPLoss(inmodal_views=True)
    loss.set_epoch(epoch, 10)
    parts = loss(image, text, scale, output_dict=True)
    assert set(parts) == {'contrastive_loss', 'inmodal_contrastive_loss', 'crossmodal_rank_loss', 'inmodal_rank_loss'}
    ours = sum(parts.values())
    expected = released_inmodal_loss(image, text, scale, epoch, 10)
    torch.testing.assert_close(ours, expected)
    ours_grad = torch.autograd.grad(ours, (image, text))
    torch.testing.assert_close(ours_grad, torch.autograd.grad(expected, (image, text)))
    assert ours_grad[0][b:].abs().sum() > 0  # the augmented views get gradient through the in-modal term


@pytest.mark.unit
def test_accumulated_micro_batches_split_into_samples_and_views():
    torch.manual_seed(0)
    b, d = 4, 8
    originals = [torch.randn(b, d) for _ in range(2)]
    views = [torch.randn(b, d) for _ in range(2)]
    texts, text_views = [torch.randn(b, d) for _ in range(2)], [torch.randn(b, d) for _ in range(2)]
    accumulated = RankCLIPLoss(inmodal_views=True, accum_freq=2)  # OpenCLIP concatenates the micro-batches
    one = RankCLIPLoss(inmodal_views=True)
    concat = lambda a, v: torch.cat([a[0], v[0], a[1], v[1]])  # noqa: E731
    grouped = lambda a, v: torch.cat([*a, *v])  # noqa: E731
    scale = torch.tensor(10.0)
    torch.testing.assert_close(accumulated(concat(originals, views), concat(texts, text_views), scale),
                               one(grouped(originals, views), grouped(texts, text_views), scale))


@pytest.mark.unit
def test_eda_operations_and_synonym_sources(tmp_path):
    text = 'a red circle on a blue background'
    corpus_free = EDA(None, alpha=0.3, seed=0)
    assert corpus_free.operations() == ['swap', 'delete']
    for _ in range(20):
        out = corpus_free(text).split()
        assert set(out) <= set(text.split()) and 1 <= len(out) <= 7
    synonyms_file = tmp_path / 'synonyms.tsv'
    synonyms_file.write_text('red\tcrimson,scarlet\ncircle\tring\nthe\tTHE\n')
    source = file_synonyms(synonyms_file)
    with_synonyms = EDA(source, alpha=0.3, seed=1)
    assert with_synonyms.operations() == ['replace', 'insert', 'swap', 'delete']
    outputs = {with_synonyms(text) for _ in range(60)}
    assert any('crimson' in o or 'scarlet' in o or 'ring' in o for o in outputs)
    assert 'the' in STOP_WORDS and 'THE' not in ' '.join(EDA(source, alpha=1.0, seed=2)('the red') for _ in range(9))
    assert EDA(source, seed=0)('') == ''
    tokenizer = open_clip.get_tokenizer('tiny-vit')
    tokens = TwoCaptionTokenizer(tokenizer, lambda t: t.upper())(['a dog', 'a cat'])
    assert tokens.shape == (2, 2, 16)
    torch.testing.assert_close(tokens[:, 0], tokenizer(['a dog', 'a cat']))


@pytest.mark.unit
def test_openclips_csv_data_carries_the_views_in_order(tmp_path):
    """Through OpenCLIP's own get_data (patched by the plugin): batches of 2B, the B samples first."""
    import open_clip_train.data
    import open_clip_train.params
    data = make_caption_dataset(str(tmp_path / 'data'), train_per_class=2, val_per_class=1)
    args = open_clip_train.params.parse_args([
        '--model', 'tiny-vit', '--dataset-type', 'csv', '--train-data', data['train'], '--val-data', data['val'],
        '--loss-opt', 'rankclip', '--rankclip-inmodal', '--rankclip-synonyms', 'none', '--batch-size', '4',
        '--workers', '0'])
    args.distributed, args.world_size, args.rank = False, 1, 0
    _, _, preprocess = open_clip.create_model_and_transforms('tiny-vit')
    tokenizer = open_clip.get_tokenizer('tiny-vit')
    loaded = open_clip_train.data.get_data(args, (preprocess, preprocess), epoch=0, tokenizer=tokenizer)
    images, texts = next(iter(loaded['train'].dataloader))
    assert images.shape[0] == 8 and texts.shape == (8, 16)
    assert loaded['train'].dataloader.num_batches == len(loaded['train'].dataloader)
    val_images, val_texts = next(iter(loaded['val'].dataloader))  # validation: OpenCLIP's single view
    assert val_texts.ndim == 2 and val_images.ndim == 4
    assert not torch.equal(images[:4], images[4:])  # AutoAugment changed the views
    batch = views_first((torch.arange(6).reshape(3, 2), torch.arange(6).reshape(3, 2)))
    assert batch[0].tolist() == [0, 2, 4, 1, 3, 5]


@pytest.mark.e2e
def test_inmodal_pretraining_runs_through_openclips_main(tmp_path):
    data = make_caption_dataset(str(tmp_path / 'data'), train_per_class=4, val_per_class=2)
    cmd = [sys.executable, '-m', 'open_clip_train.main', '--model', 'tiny-vit', '--dataset-type', 'csv',
           '--train-data', data['train'], '--loss-opt', 'rankclip', '--rankclip-inmodal', '--epochs', '2',
           '--batch-size', '8', '--accum-freq', '2', '--lr', '1e-3', '--warmup', '2', '--workers', '1', '--seed', '0',
           '--name', 'inmodal', '--log-every-n-steps', '1']
    result = subprocess.run(cmd, env=subprocess_env(OPEN_CLIP_RANK_MODEL_CONFIGS=str(TEST_CONFIG_DIR)),
                            cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / 'logs' / 'inmodal' / 'out.log').read_text()
    assert '--rankclip-inmodal: every training sample also as an AutoAugment image' in log
    line = [l for l in log.splitlines() if 'Train Epoch: 1 ' in l][-1]
    values = {name: float(v) for name, v in re.findall(r'(\w+_loss|Loss): ([\d.]+) ', line)}
    assert {'Contrastive_loss', 'Inmodal_contrastive_loss', 'Crossmodal_rank_loss', 'Inmodal_rank_loss'} <= set(values)
    assert values['Inmodal_contrastive_loss'] > 0
