"""OrdinalCLIP options (issue #22): the paper's data experiments (few-shot, label shift, long tail), ordinality at
the official spans and over a rank window, the official preprocessing, the freeze-context / freeze-ranks ablations,
the CNN baseline model, and the torchvision -> timm VGG-16 weight converter."""
import argparse
import importlib.util
import json
import logging
import random
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import open_clip
from helpers import REPO_ROOT, call_main, run_openclip_main
from open_clip_rank.data import RankDataError
from open_clip_rank.data.ordinal_dataset import OrdinalTable, collate_ordinal_batch
from open_clip_rank.data.ordinal_options import (check_ordinal_data_args, few_shot_subset, label_shift_subset,
                                                 long_tail_subset, official_transforms, rank_counts, training_subset,
                                                 validation_subset)
from open_clip_rank.evaluation.ordinal import (ordinal_report, ordinal_validation, ordinality_metrics,
                                               ordinality_spans, prototype_ordinality)
from open_clip_rank.integration import run_state
from open_clip_rank.losses.ordinal import OrdinalLoss
from open_clip_rank.models.ordinal import OrdinalCLIP, OrdinalTargets
from open_clip_rank.synthetic.ordinal import make_ordinal_dataset

NUM_RANKS = 6


def _table(counts, num_ranks=NUM_RANKS, extra_labels=False):
    """counts[r] images of rank r, interleaved (rank order of first appearance: 0, 1, 2, ...)."""
    paths, labels = [], []
    for k in range(max(counts)):
        for r, n in enumerate(counts):
            if k < n:
                paths.append(f'img_{r}_{k}.png')
                labels.append([max(r - 1, 0), r, min(r + 1, num_ranks - 1)] if extra_labels else [r])
    return OrdinalTable(paths, labels, num_ranks, 'train.txt')


# --- 1. data experiments ----------------------------------------------------------------------------------

@pytest.mark.unit
def test_few_shot_keeps_n_per_rank_drawn_with_the_seed_and_the_middle_label():
    table = _table([10, 3, 7, 0, 12, 5], extra_labels=True)
    subset = few_shot_subset(table, 4, random.Random(0))
    assert rank_counts(subset) == [4, 3, 4, 0, 4, 4]  # a rank with fewer keeps all of its images
    assert all(len(labels) == 1 for labels in subset.labels)  # the evaluation (middle) label, as the official
    assert all(path.startswith(f'img_{labels[0]}_') for path, labels in zip(subset.paths, subset.labels))
    assert len(set(subset.paths)) == len(subset)  # without replacement
    again = few_shot_subset(table, 4, random.Random(0))
    assert again.paths == subset.paths  # deterministic given the seed
    assert any(few_shot_subset(table, 4, random.Random(seed)).paths != subset.paths for seed in (1, 2, 3))


@pytest.mark.unit
def test_label_shift_scales_down_the_k_largest_ranks():
    table = _table([10, 3, 8, 8, 12, 5])
    subset = label_shift_subset(table, 3, 0.2, random.Random(0))
    # largest first, ties in order of first appearance: ranks 4 (12), 0 (10), 2 (8); rank 3 (8) is not scaled
    assert rank_counts(subset) == [2, 3, 1, 8, 2, 5]  # max(int(n * 0.2), 1)
    assert set(subset.paths) <= set(table.paths)
    assert label_shift_subset(table, 3, 0.2, random.Random(0)).paths == subset.paths


@pytest.mark.unit
def test_long_tail_keeps_evaluation_labels_from_the_minimum_rank():
    table = _table([2, 2, 2, 2, 2, 2], extra_labels=True)
    subset = long_tail_subset(table, 4)
    assert rank_counts(subset) == [0, 0, 0, 0, 2, 2]
    assert subset.labels[0] == [3, 4, 5]  # the labels themselves are kept
    with pytest.raises(RankDataError, match=r"--ordinal-long-tail 9 leaves no image"):
        long_tail_subset(table, 9)


@pytest.mark.unit
def test_subsets_from_the_flags_are_logged_with_counts_per_rank(caplog):
    table = _table([4, 5, 6, 7, 8, 8])
    args = argparse.Namespace(ordinal_few_shot=6, ordinal_label_shift=2, ordinal_label_shift_scale=0.5, seed=0,
                              ordinal_long_tail=3)
    with caplog.at_level(logging.INFO, logger='open_clip_rank.data.ordinal_options'):
        subset = training_subset(table, args)
        val = validation_subset(table, args)
    assert rank_counts(subset) == [4, 5, 3, 3, 6, 6]  # few-shot [4, 5, 6, 6, 6, 6], then ranks 2 and 3 halved
    assert rank_counts(val) == [0, 0, 0, 7, 8, 8]
    assert 'before: [4, 5, 6, 7, 8, 8]' in caplog.text and 'after: [4, 5, 6, 6, 6, 6]' in caplog.text
    assert 'after: [4, 5, 3, 3, 6, 6]' in caplog.text and 'after: [0, 0, 0, 7, 8, 8]' in caplog.text
    assert training_subset(table, args, log=False).paths == subset.paths
    plain = argparse.Namespace(seed=0)
    assert training_subset(table, plain) is table and validation_subset(table, plain) is table


def _flag_args(**overrides):
    args = dict(csv_dataset_sample_type='ordinal', ordinal_few_shot=0, ordinal_label_shift=0,
                ordinal_label_shift_scale=None, ordinal_long_tail=None, ordinal_official_transforms=False,
                ordinal_rank_window=None, dataset_type='csv', train_data='train.txt', val_data='val.txt')
    args.update(overrides)
    return argparse.Namespace(**args)


@pytest.mark.unit
@pytest.mark.parametrize('overrides, message', [
    ({'ordinal_few_shot': 4, 'csv_dataset_sample_type': 'rank'}, r"--ordinal-few-shot is an option of ordinal data"),
    ({'ordinal_few_shot': -1}, r"--ordinal-few-shot must be >= 0"),
    ({'ordinal_label_shift': 10}, r"--ordinal-label-shift 10 needs --ordinal-label-shift-scale in \(0, 1\)"),
    ({'ordinal_label_shift': 10, 'ordinal_label_shift_scale': 1.0}, r"needs --ordinal-label-shift-scale in"),
    ({'ordinal_label_shift_scale': 0.1}, r"--ordinal-label-shift-scale scales the ranks of --ordinal-label-shift"),
    ({'ordinal_rank_window': [5, 5]}, r"--ordinal-rank-window LO HI needs 0 <= LO < HI"),
    ({'ordinal_long_tail': 50, 'dataset_type': 'webdataset'}, r"--ordinal-long-tail selects images .* shards"),
    ({'ordinal_long_tail': 50, 'val_data': None}, r"--ordinal-long-tail applies to validation: add --val-data"),
    ({'ordinal_few_shot': 4, 'train_data': None}, r"--ordinal-few-shot selects training images: add --train-data"),
])
def test_bad_data_flags_are_refused_with_one_line(overrides, message):
    with pytest.raises(ValueError, match=message):
        check_ordinal_data_args(_flag_args(**overrides))
    check_ordinal_data_args(_flag_args())  # nothing given: nothing to refuse


@pytest.fixture(scope='module')
def small_data(tmp_path_factory):
    return make_ordinal_dataset(tmp_path_factory.mktemp('ordinal_options'), num_ranks=NUM_RANKS, train_per_rank=8,
                                val_per_rank=2, image_size=32, seed=3)


@pytest.mark.unit
@pytest.mark.parametrize('flags, message', [
    (['--ordinal-few-shot', '1'], r"train.txt \(after --ordinal-few-shot 1\) has 6 rows, fewer than one batch"),
    (['--ordinal-rank-window', '2', '6'], r"--ordinal-rank-window 2 6 does not fit the model's ranks 0..5"),
    (['--ordinal-long-tail', '9'], r"--ordinal-long-tail 9 leaves no image"),
    (['--model', 'tiny-vit', '--ordinal-freeze-context'],
     r"--ordinal-freeze-context is for ordinal models \(\*-ordinal configs\), not tiny-vit"),
])
def test_subsets_window_and_freeze_flags_are_checked_before_the_run_starts(small_data, tmp_path, flags, message):
    argv = ['--model', 'tiny-rn-ordinal', '--dataset-type', 'csv', '--csv-dataset-sample-type', 'ordinal',
            '--train-data', small_data['train_list'], '--val-data', small_data['val_list'], '--image-root',
            small_data['root'], '--batch-size', '8', '--epochs', '1', '--name', 'refused', *flags]
    result = run_openclip_main(argv, tmp_path, in_process=True)
    errors = [line for line in result.stderr.splitlines() if line.startswith('open_clip_rank: error:')]
    assert result.returncode != 0 and len(errors) == 1, result.stderr[-2000:]
    assert re.search(message, errors[0]), errors[0]
    assert not (tmp_path / 'logs' / 'refused').exists()


# --- 2. ordinality ----------------------------------------------------------------------------------------

def _official_span_ordinality(prototypes, span):
    """The official vis_ordinality's mask algebra, restated in numpy: the upper triangle of the [n-1, n-1]
    comparison matrix, with the top-right (n-1-span) block cut to its strict lower triangle."""
    p = prototypes / np.linalg.norm(prototypes, axis=1, keepdims=True)
    sim = p @ p.T
    sim = sim / sim.max()
    c = len(p) - 1
    signs = np.triu(sim[:-1, :-1] > sim[:-1, 1:])
    mask = np.ones((c, c), dtype=bool)
    m = c - span
    if m > 0:
        mask[:m, -m:] &= ~np.triu(np.ones((m, m), dtype=bool))
    mask = np.triu(mask)
    return (signs & mask).sum() / mask.sum()


@pytest.mark.unit
def test_ordinality_at_every_official_span_matches_the_official_computation():
    rng = np.random.default_rng(0)
    drift = np.cumsum(rng.normal(size=(101, 16)), axis=0)  # partly ordinal prototypes
    prototypes = drift + 3 * rng.normal(size=(101, 16))
    assert ordinality_spans(101) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert ordinality_spans(61) == [1, 2, 4, 8, 16, 32, 60] and ordinality_spans(5) == [1, 2, 4]
    for span in ordinality_spans(101):
        assert prototype_ordinality(prototypes, span) == pytest.approx(_official_span_ordinality(prototypes, span))
    assert prototype_ordinality(prototypes) == prototype_ordinality(prototypes, 100)  # the full span, as before
    window = prototypes[15:76]  # the official MORPH crop
    metrics = ordinality_metrics(prototypes, window=(15, 75))
    assert set(metrics) == {'ordinality', *(f'ordinality_span_{s}' for s in (1, 2, 4, 8, 16, 32, 60))}
    assert metrics['ordinality_span_8'] == pytest.approx(_official_span_ordinality(window, 8))
    assert metrics['ordinality'] == metrics['ordinality_span_60']


def _model(name='tiny-rn-ordinal'):
    torch.manual_seed(0)
    return open_clip.create_model(name).eval()


@pytest.mark.unit
def test_validation_and_rank_cli_report_ordinality_by_span_over_the_window(caplog):
    model = _model()
    table = _table([2] * NUM_RANKS)
    images = [(torch.randn(3, 32, 32), label[0]) for label in table.labels]
    loader = torch.utils.data.DataLoader(images, batch_size=4, collate_fn=collate_ordinal_batch)
    args = argparse.Namespace(device='cpu', precision='fp32', save_logs=False, ordinal_rank_window=[1, 4])
    metrics = ordinal_validation(model, SimpleNamespace(dataloader=loader, table=table), args)
    protos = model.rank_prototypes().numpy()
    assert {'mae_exp', 'ordinality', 'ordinality_span_1', 'ordinality_span_2', 'ordinality_span_3'} <= set(metrics)
    assert 'ordinality_span_4' not in metrics  # 4 prototypes (ranks 1..4): spans 1, 2, 3
    assert metrics['ordinality'] == pytest.approx(prototype_ordinality(protos[1:5]))
    report = ordinal_report(argparse.Namespace(plots=None, ordinal_rank_window=[1, 4]), model, [])
    assert report['ordinality_window'] == [1, 4] and list(report['ordinality_spans']) == ['1', '2', '3']
    assert report['ordinality'] == pytest.approx(metrics['ordinality'])
    with caplog.at_level(logging.ERROR):
        wide = ordinal_report(argparse.Namespace(plots=None, ordinal_rank_window=[1, 9]), model, [])
    assert wide['ordinality_window'] is None and 'does not fit the model\'s ranks 0..5' in caplog.text
    assert wide['ordinality'] == pytest.approx(prototype_ordinality(protos))


# --- 3. the official preprocessing -------------------------------------------------------------------------

@pytest.mark.unit
def test_official_transforms_resize_crop_flip_and_imagenet_normalisation():
    from PIL import Image
    from torchvision import transforms as T
    _, _, preprocess_val = open_clip.create_model_and_transforms('tiny-rn-ordinal')
    train, val = official_transforms(open_clip.image_transform(224, is_train=False))
    kinds = [type(t) for t in train.transforms]
    assert kinds == [T.Resize, T.RandomCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    assert [type(t) for t in val.transforms] == [T.Resize, T.CenterCrop, T.ToTensor, T.Normalize]
    assert train.transforms[0].size == (256, 256) and train.transforms[1].size == (224, 224)
    assert val.transforms[1].size == (224, 224)
    assert val.transforms[-1].mean == (0.485, 0.456, 0.406) and val.transforms[-1].std == (0.229, 0.224, 0.225)
    small_train, small_val = official_transforms(preprocess_val)  # the tiny model's 32 px: resize 37, crop 32
    assert small_train.transforms[0].size == (37, 37)
    image = Image.new('RGB', (50, 40), (200, 10, 10))
    assert small_train(image).shape == (3, 32, 32) and small_val(image).shape == (3, 32, 32)
    red = (200 / 255 - 0.485) / 0.229
    assert small_val(image)[0, 16, 16].item() == pytest.approx(red, abs=1e-4)


@pytest.mark.unit
def test_get_ordinal_data_applies_subsets_and_official_transforms(small_data):
    from open_clip_rank.data.ordinal import get_ordinal_data
    args = argparse.Namespace(
        model='tiny-rn-ordinal', train_data=small_data['train_list'], val_data=small_data['val_list'],
        image_root=small_data['root'], csv_img_key='filepath', csv_value_key='value', csv_separator='\t',
        dataset_type='csv', batch_size=4, world_size=1, distributed=False, workers=0, seed=0,
        ordinal_few_shot=3, ordinal_label_shift=0, ordinal_label_shift_scale=None, ordinal_long_tail=4,
        ordinal_official_transforms=True)
    _, preprocess_train, preprocess_val = open_clip.create_model_and_transforms('tiny-rn-ordinal')
    data = get_ordinal_data(args, (preprocess_train, preprocess_val))
    train, val = data['train'].dataloader.dataset, data['val'].dataloader.dataset
    assert len(train) == 3 * NUM_RANKS and rank_counts(train.table) == [3] * NUM_RANKS
    assert rank_counts(val.table) == [0, 0, 0, 0, 2, 2]
    assert type(train.transform.transforms[1]).__name__ == 'RandomCrop'
    assert type(val.transform.transforms[1]).__name__ == 'CenterCrop'
    images, targets = next(iter(data['train'].dataloader))
    assert images.shape == (4, 3, 32, 32) and isinstance(targets, OrdinalTargets)


# --- 4. freeze-context / freeze-ranks -----------------------------------------------------------------------

@pytest.fixture
def training_run():
    def start(**flags):
        return run_state.start_run(argparse.Namespace(**flags))
    yield start
    run_state.end_run()


def _trainable(model):
    """What OpenCLIP's optimiser collects: the parameters that require a gradient."""
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.unit
@pytest.mark.parametrize('flags, frozen', [
    ({'ordinal_freeze_context': True}, 'prompt_learner.context_embeds'),
    ({'ordinal_freeze_ranks': True}, 'prompt_learner.rank_embeds'),
])
def test_freeze_flags_leave_the_other_prompt_part_training(training_run, flags, frozen, caplog):
    other = ({'prompt_learner.context_embeds', 'prompt_learner.rank_embeds'} - {frozen}).pop()
    training_run(**flags)
    with caplog.at_level(logging.INFO, logger='open_clip_rank.models.ordinal'):
        model = _model()
    assert frozen not in _trainable(model) and other in _trainable(model)
    assert 'frozen (not trained)' in caplog.text
    before = dict(model.named_parameters())[frozen].detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    out = model(torch.randn(4, 3, 32, 32), OrdinalTargets(torch.tensor([0, 1, 2, 5])))
    OrdinalLoss()(**out).backward()
    assert dict(model.named_parameters())[other].grad is not None
    optimizer.step()
    assert torch.equal(dict(model.named_parameters())[frozen], before)
    run_state.end_run()
    assert _trainable(_model()) >= {'prompt_learner.context_embeds', 'prompt_learner.rank_embeds'}  # no run: off


@pytest.mark.unit
def test_freeze_context_is_refused_for_the_baseline():
    from open_clip_rank.models.ordinal_options import check_ordinal_start
    args = argparse.Namespace(model='tiny-rn-baseline-ordinal', ordinal_freeze_context=True)
    with pytest.raises(ValueError, match=r"baseline .* has no context embeddings; use --ordinal-freeze-ranks"):
        check_ordinal_start(args, open_clip.get_model_config('tiny-rn-baseline-ordinal'))
    check_ordinal_start(args, open_clip.get_model_config('tiny-rn-ordinal'))
    with pytest.raises(ValueError, match=r"has no context embeddings"):
        _model('tiny-rn-baseline-ordinal').freeze_prompt_parts(context=True)


# --- 5. the CNN baseline --------------------------------------------------------------------------------------

@pytest.mark.unit
def test_baseline_is_a_cosine_classifier_on_learned_prototypes_without_text(monkeypatch, tmp_path, training_run):
    model = _model('tiny-rn-baseline-ordinal')
    assert isinstance(model, OrdinalCLIP) and model.ordinal_cfg.is_baseline
    assert _trainable(model) == {n for n, _ in model.named_parameters() if n.startswith(('visual.', 'prompt_learner.'))}
    monkeypatch.setattr(model, 'encode_text', None)  # the text tower never runs
    images = torch.randn(3, 3, 32, 32)
    out = model(images, OrdinalTargets(torch.tensor([0, 3, 5])))
    expected = 100.0 * model.encode_image(images, normalize=True) @ F.normalize(model.prompt_learner.prototypes, dim=-1).T
    torch.testing.assert_close(out['ordinal_logits'], expected)  # the official Baseline: 100 * cos
    OrdinalLoss()(**out).backward()
    assert model.prompt_learner.prototypes.grad is not None
    # a checkpoint round trip, frozen prototypes, and --ordinal-freeze-ranks (the official runner's untrained head)
    path = tmp_path / 'baseline.pt'
    torch.save(model.state_dict(), path)
    fresh = open_clip.create_model('tiny-rn-baseline-ordinal', pretrained=str(path)).eval()
    torch.testing.assert_close(fresh(images)['ordinal_logits'], out['ordinal_logits'].detach())
    fresh.freeze_prototypes()
    torch.testing.assert_close(fresh(images)['ordinal_logits'], out['ordinal_logits'].detach())
    training_run(ordinal_freeze_ranks=True)
    assert 'prompt_learner.prototypes' not in _trainable(_model('tiny-rn-baseline-ordinal'))


@pytest.mark.unit
def test_baseline_keeps_its_prototypes_when_base_weights_load(tmp_path):
    cfg = open_clip.get_model_config('tiny-rn-baseline-ordinal')
    plain = open_clip.model.CLIP(cfg['embed_dim'], cfg['vision_cfg'], cfg['text_cfg'])
    path = tmp_path / 'base.pt'
    torch.save(plain.state_dict(), path)
    model = _model('tiny-rn-baseline-ordinal')
    before = model.prompt_learner.prototypes.detach().clone()
    open_clip.load_checkpoint(model, str(path))
    torch.testing.assert_close(model.visual.attnpool.c_proj.weight, plain.visual.attnpool.c_proj.weight)
    assert torch.equal(model.prompt_learner.prototypes, before)


@pytest.mark.unit
@pytest.mark.parametrize('key, value', [('init_context', 'the age is'), ('rank_names', ['a', 'b', 'c']),
                                        ('rank_specific_context', True)])
def test_baseline_refuses_prompt_keys(key, value):
    from open_clip_rank.models.ordinal_prompts import OrdinalCfg
    with pytest.raises(ValueError, match=rf"ordinal_cfg.{key}=.*the baseline has no prompts"):
        OrdinalCfg.from_dict({'prompt_learner': 'baseline', key: value})


@pytest.mark.unit
def test_shipped_baseline_configs_build_and_rn50_derives_openai_weights():
    for name, dim in (('RN50-baseline-ordinal', 1024), ('vgg16-baseline-ordinal', 1024)):
        with torch.device('meta'):
            model = open_clip.create_model(name, device='meta')
        assert model.ordinal_cfg.is_baseline and model.prompt_learner.prototypes.shape == (101, dim)
    assert 'openai' in open_clip.list_pretrained_tags_by_model('RN50-baseline-ordinal')


# --- 6. VGG-16 weights: torchvision -> timm -----------------------------------------------------------------

def _converter():
    spec = importlib.util.spec_from_file_location('convert_vgg16_weights',
                                                  REPO_ROOT / 'scripts' / 'convert_vgg16_weights.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def torchvision_vgg(tmp_path_factory):
    """A random torchvision vgg16 with the ordinal configs' 1024-d head, saved in its own layout."""
    import torchvision
    torch.manual_seed(0)
    net = torchvision.models.vgg16(num_classes=1024).eval()
    path = tmp_path_factory.mktemp('vgg') / 'vgg16_torchvision.pth'
    torch.save({'state_dict': {f'module.{k}': v for k, v in net.state_dict().items()}}, path)  # as a runner saves
    return net, path


@pytest.mark.unit
def test_converted_vgg16_weights_give_timm_the_same_function(torchvision_vgg, tmp_path):
    import timm
    net, source = torchvision_vgg
    out = tmp_path / 'timm.pt'
    result = call_main(_converter().main, [source, out])
    assert result.returncode == 0, result.stderr
    with torch.device('meta'):  # as the config's trunk; no random initialisation to wait for
        timm_net = timm.create_model('vgg16', num_classes=1024, global_pool='avg').eval()
    timm_net.load_state_dict(torch.load(out, weights_only=True), assign=True)  # strict: every key, every shape
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(timm_net(x), net(x), rtol=1e-4, atol=1e-4)


@pytest.mark.unit
def test_converted_weights_load_as_the_vgg16_baselines_pretrained_file(torchvision_vgg, tmp_path):
    """--model writes keys under visual.trunk.: --pretrained FILE loads the tower, the prototypes start fresh."""
    net, source = torchvision_vgg
    out = tmp_path / 'base.pt'
    result = call_main(_converter().main, [source, out, '--model', 'vgg16-baseline-ordinal'])
    assert result.returncode == 0, result.stderr
    model = open_clip.create_model('vgg16-baseline-ordinal', pretrained=str(out)).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), net(x), rtol=1e-4, atol=1e-4)


@pytest.mark.unit
def test_official_head_without_bias_and_model_base_weights(torchvision_vgg, tmp_path):
    converter = _converter()
    state = {k: v for k, v in torchvision_vgg[0].state_dict().items() if k != 'classifier.6.bias'}
    converted, notes = converter.convert(state, head_dim=1024)
    assert torch.equal(converted['head.fc.bias'], torch.zeros(1024)) and 'no bias' in notes[0]
    ages = dict(state, **{'classifier.6.weight': torch.zeros(101, 4096)})  # IMDB-WIKI's 101 ages: left out
    converted, notes = converter.convert(ages, head_dim=1024)
    assert 'head.fc.weight' not in converted and '101 outputs' in notes[0]
    clip = {'visual.conv1.weight': torch.zeros(1), 'transformer.resblocks.0.attn.in_proj_weight': torch.ones(2),
            'logit_scale': torch.tensor(4.6)}
    merged = converter.with_clip_weights(converted, clip)
    assert 'visual.trunk.features.0.weight' in merged and 'visual.conv1.weight' not in merged
    assert torch.equal(merged['logit_scale'], clip['logit_scale']) and 'transformer.resblocks.0.attn.in_proj_weight' in merged
    assert converter.tower_config('vgg16-baseline-ordinal') == 1024
    with pytest.raises(converter.ConversionError, match="not timm's vgg16"):
        converter.tower_config('tiny-rn-ordinal')
    bn = dict(state, **{'features.1.running_mean': torch.zeros(64)})
    with pytest.raises(converter.ConversionError, match=r"unknown \['features.1.running_mean'\]"):
        converter.convert(bn)
    bad = tmp_path / 'bad.pt'
    torch.save({'features.0.weight': torch.zeros(1)}, bad)
    result = call_main(converter.main, [bad, tmp_path / 'out.pt'])
    assert result.returncode == 2 and "not VGG-16 weights in torchvision's layout" in result.stderr


# --- one short training run with every data option ------------------------------------------------------------

@pytest.mark.e2e
def test_training_with_subsets_official_transforms_frozen_context_and_window(small_data, tmp_path):
    root = Path(small_data['root'])
    lines = Path(small_data['train_list']).read_text().splitlines()
    keep = {r: 4 + min(r, 4) for r in range(NUM_RANKS)}  # [4, 5, 6, 7, 8, 8] images per rank
    uneven = [line for line in lines if int(line.split()[0].split('_')[-1].split('.')[0]) < keep[int(line.split()[1])]]
    train = tmp_path / 'train.txt'
    train.write_text('\n'.join(uneven) + '\n')
    argv = ['--model', 'tiny-rn-ordinal', '--dataset-type', 'csv', '--csv-dataset-sample-type', 'ordinal',
            '--train-data', train, '--val-data', small_data['val_list'], '--image-root', root, '--batch-size', '8',
            '--lr', '1e-3', '--warmup', '0', '--workers', '0', '--seed', '0', '--epochs', '1', '--name', 'options',
            '--precision', 'fp32', '--ordinal-few-shot', '6', '--ordinal-label-shift', '2',
            '--ordinal-label-shift-scale', '0.5', '--ordinal-long-tail', '3', '--ordinal-official-transforms',
            '--ordinal-freeze-context', '--ordinal-rank-window', '1', '4']
    result = run_openclip_main(argv, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / 'logs' / 'options' / 'out.log').read_text()
    for line in ('before: [4, 5, 6, 7, 8, 8]', 'after: [4, 5, 6, 6, 6, 6]', 'after: [4, 5, 3, 3, 6, 6]',
                 'after: [0, 0, 0, 2, 2, 2]', 'context embeddings frozen', 'RandomCrop(size=(32, 32)',
                 'Ordinal training data: 27 images, 6 ranks, 3 batches of 8'):
        assert line in log, line
    record = json.loads((tmp_path / 'logs' / 'options' / 'checkpoints' / 'results.jsonl').read_text().splitlines()[-1])
    assert {'ordinality', 'ordinality_span_1', 'ordinality_span_2', 'ordinality_span_3', 'mae_exp'} <= set(record)


@pytest.mark.unit
def test_the_rank_cli_preprocesses_as_official_training_when_asked(tmp_path):
    """A model trained with --ordinal-official-transforms is ranked with the official evaluation preprocessing."""
    import json as _json

    from PIL import Image
    from torchvision import transforms as T

    from open_clip_rank.data.ordinal_options import IMAGENET_MEAN, official_cli_transform
    from open_clip_rank.rank import main
    from helpers import call_main
    _, _, preprocess = open_clip.create_model_and_transforms('tiny-rn-ordinal')
    official = official_cli_transform(SimpleNamespace(ordinal_official_transforms=True), None, preprocess)
    assert any(isinstance(t, T.Normalize) and tuple(t.mean) == IMAGENET_MEAN for t in official.transforms)
    assert official_cli_transform(SimpleNamespace(), None, preprocess) is preprocess
    images = tmp_path / 'images'
    images.mkdir()
    for i in range(3):
        Image.effect_noise((48, 40), 30 + 20 * i).convert('RGB').save(images / f'{i}.png')
    probs = {}
    for flag in ([], ['--ordinal-official-transforms']):
        out = tmp_path / f'out{len(flag)}'
        done = call_main(main, ['--model', 'tiny-rn-ordinal', '--random-weights', '--device', 'cpu', '--images',
                                images, '--output-path', out, '--probabilities', '--no-progress', '--workers', '0',
                                *flag])
        assert done.returncode == 0, done.stderr[-2000:]
        probs[bool(flag)] = [p['probs'] for p in _json.loads(out.with_suffix('.json').read_text())['probabilities']]
    assert probs[True] != probs[False]
