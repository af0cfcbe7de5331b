"""CLIP_benchmark (``clip_benchmark eval``, part of the test extra) evaluates OpenCLIP checkpoints with the plugin
installed: a RankCLIP-pretrained checkpoint in its released layout (``--model ViT-B-32-quickgelu --pretrained
epoch_64.pt`` in the docs; here the tiny QuickGELU ViT of tests/model_configs) and a checkpoint of a plugin model
(zero-shot through its towers), on a tiny local webdataset in CLIP_benchmark's ``wds/`` layout.

The toy images are labelled with the checkpoint's own zero-shot predictions (over at least three classes, with a
clear top-1 margin), so 100 % accuracy in CLIP_benchmark's result file shows that the file's weights were
evaluated: a model with other weights predicts other classes. CLIP_benchmark's linear probe runs on CUDA only
(``assert device == 'cuda'`` in its ``linear_probe.evaluate``); its test runs where a GPU is visible.
"""
import importlib.util
import io
import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import open_clip
from helpers import TEST_CONFIG_DIR, run, subprocess_env
from open_clip_rank.files.integrity import add_checksum

CLASSES = ('apple', 'bicycle', 'cloud', 'dolphin', 'engine', 'forest', 'guitar', 'harbour', 'igloo', 'jacket')
TEMPLATES = ('a photo of a {c}.', 'a drawing of the {c}.')
PLAIN = 'tiny-vit-w64-quickgelu'  # the released RankCLIP checkpoints' layout: QuickGELU towers (docs/rankclip.md)
ADAPTER = 'tiny-vit-adapter'  # a plugin model: OpenCLIP's encode_image / encode_text contract on its towers
MIN_CLASSES, MIN_MARGIN = 3, 0.01  # predicted classes; top-1 minus top-2 logit (100 x cosine) on every image


def clip_benchmark_command():
    if importlib.util.find_spec('clip_benchmark') is None:
        pytest.fail("clip_benchmark is not installed: it is part of the test extra (pip install -e '.[test]')",
                    pytrace=False)
    script = Path(sys.executable).with_name('clip_benchmark')  # the console script users run
    return [str(script)] if script.is_file() else [sys.executable, '-m', 'clip_benchmark.cli']


def clip_benchmark_eval(cwd, *args, env=None):
    env = env or subprocess_env(OPEN_CLIP_RANK_MODEL_CONFIGS=TEST_CONFIG_DIR)
    result = run([*clip_benchmark_command(), 'eval', *map(str, args)], env, cwd=cwd)
    assert result.returncode == 0, f"clip_benchmark eval failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


# --- toy data -------------------------------------------------------------------------------------------

def toy_images(count, seed):
    """32 px images: a background colour and a square of another colour, at random places."""
    rng = np.random.default_rng(seed)

    def colour():
        return tuple(int(v) for v in rng.integers(0, 256, 3))

    images = []
    for _ in range(count):
        image = Image.new('RGB', (32, 32), colour())
        x, y = (int(v) for v in rng.integers(0, 20, 2))
        ImageDraw.Draw(image).rectangle([x, y, x + 12, y + 12], fill=colour())
        images.append(image)
    return images


def write_wds_split(root, split, images, labels):
    """CLIP_benchmark's local webdataset layout (what ``clip_benchmark_export_wds`` writes): ``ROOT/SPLIT/0.tar``
    (``KEY.png`` + ``KEY.cls``), ``ROOT/SPLIT/nshards.txt``, ``ROOT/classnames.txt`` and
    ``ROOT/zeroshot_classification_templates.txt`` (one per line, ``{c}`` for the class name)."""
    root = Path(root)
    (root / split).mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / split / '0.tar', 'w') as tar:
        for index, (image, label) in enumerate(zip(images, labels)):
            png = io.BytesIO()
            image.save(png, format='png')
            for suffix, data in (('png', png.getvalue()), ('cls', str(int(label)).encode())):
                info = tarfile.TarInfo(f's{index:07d}.{suffix}')
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (root / split / 'nshards.txt').write_text('1\n')
    (root / 'classnames.txt').write_text('\n'.join(CLASSES) + '\n')
    (root / 'zeroshot_classification_templates.txt').write_text('\n'.join(TEMPLATES) + '\n')


# --- checkpoints labelled by their own predictions -----------------------------------------------------

@torch.no_grad()
def zero_shot_logits(model, preprocess, tokenizer, images):
    """CLIP_benchmark's zero-shot classifier restated: per class the mean of the normalised template embeddings,
    normalised; logits 100 x cosine with the normalised image features (float32, as ``--no_amp``)."""
    model.eval()
    classifier = []
    for name in CLASSES:
        embedding = F.normalize(model.encode_text(tokenizer([t.format(c=name) for t in TEMPLATES])), dim=-1).mean(0)
        classifier.append(embedding / embedding.norm())
    image_features = F.normalize(model.encode_image(torch.stack([preprocess(i) for i in images])), dim=-1)
    return 100. * image_features @ torch.stack(classifier, dim=1)


def save_training_checkpoint(model, path, epoch, name, checksum=False):
    """As RankCLIP's main.py and OpenCLIP's trainer save under DDP: ``module.``-prefixed keys, optimizer beside;
    ``checksum``: as a training run with the plugin saves it (verified wherever it is loaded)."""
    checkpoint = {'epoch': epoch, 'name': name,
                  'state_dict': {f'module.{k}': v for k, v in model.state_dict().items()},
                  'optimizer': {'state': {}, 'param_groups': [{'lr': 5e-4, 'params': []}]}}
    torch.save(add_checksum(checkpoint) if checksum else checkpoint, path)


def checkpoint_with_spread_predictions(model_name, path, images, epoch=64, checksum=False):
    """Saves a randomly initialised ``model_name`` whose zero-shot predictions on ``images`` cover at least
    MIN_CLASSES classes with a top-1 margin of at least MIN_MARGIN; returns those predictions (the labels)."""
    tokenizer = open_clip.get_tokenizer(model_name)
    with torch.random.fork_rng():
        for seed in range(1, 100):
            torch.manual_seed(seed)
            model, _, preprocess = open_clip.create_model_and_transforms(model_name)
            logits = zero_shot_logits(model, preprocess, tokenizer, images)
            top2 = logits.topk(2, dim=1).values
            labels = logits.argmax(dim=1)
            if len(labels.unique()) >= MIN_CLASSES and (top2[:, 0] - top2[:, 1]).min() >= MIN_MARGIN:
                save_training_checkpoint(model, path, epoch, f'{model_name}-seed{seed}', checksum=checksum)
                # a model with other weights (what a run that ignored the file would evaluate) predicts otherwise
                torch.manual_seed(0)
                other, _, other_preprocess = open_clip.create_model_and_transforms(model_name)
                other_labels = zero_shot_logits(other, other_preprocess, tokenizer, images).argmax(dim=1)
                assert (other_labels != labels).any()
                return labels
    pytest.fail(f"no initialisation of {model_name} spreads its predictions over {MIN_CLASSES} classes")


def assert_every_image_right(result_file, dataset, model, pretrained, task='zeroshot_classification'):
    result = json.loads(Path(result_file).read_text())
    assert (result['dataset'], result['model'], result['pretrained'], result['task']) == (
        dataset, model, pretrained, task)
    metrics = result['metrics']
    assert metrics['acc1'] == pytest.approx(1.0) and metrics['mean_per_class_recall'] == pytest.approx(1.0), metrics
    return metrics


# --- the tests -------------------------------------------------------------------------------------------

@pytest.mark.e2e
def test_rankclip_checkpoint_zero_shot_with_the_documented_command(tmp_path):
    """``clip_benchmark eval --model M --pretrained epoch_64.pt --dataset wds/NAME --dataset_root DIR``, the
    checkpoint in RankCLIP's released layout (QuickGELU ViT, ``module.`` keys, optimizer state beside)."""
    images = toy_images(40, seed=0)
    labels = checkpoint_with_spread_predictions(PLAIN, tmp_path / 'epoch_64.pt', images)
    write_wds_split(tmp_path / 'toy', 'test', images, labels)
    clip_benchmark_eval(tmp_path, '--model', PLAIN, '--pretrained', 'epoch_64.pt',
                        '--dataset', 'wds/toy', '--dataset_root', 'toy', '--task', 'zeroshot_classification',
                        '--output', 'toy_{pretrained}_{model}_{task}.json',
                        '--no_amp', '--batch_size', 16, '--num_workers', 0)
    metrics = assert_every_image_right(tmp_path / f'toy_epoch_64.pt_{PLAIN}_zeroshot_classification.json',
                                       'wds/toy', PLAIN, 'epoch_64.pt')
    assert metrics['acc5'] == pytest.approx(1.0)  # ten classes: CLIP_benchmark reports top-5 too


@pytest.mark.e2e
def test_plugin_model_checkpoint_zero_shot_through_its_towers(tmp_path):
    """A rank model's checkpoint as a training run with the plugin saves it (``--model tiny-vit-adapter``, with
    the plugin's checksum): verified and loaded by the plugin, evaluated through OpenCLIP's ``encode_image`` /
    ``encode_text`` on its towers."""
    images = toy_images(40, seed=1)
    labels = checkpoint_with_spread_predictions(ADAPTER, tmp_path / 'epoch_1.pt', images, epoch=1, checksum=True)
    write_wds_split(tmp_path / 'toy', 'test', images, labels)
    clip_benchmark_eval(tmp_path, '--model', ADAPTER, '--pretrained', 'epoch_1.pt',
                        '--dataset', 'wds/toy', '--dataset_root', 'toy', '--task', 'zeroshot_classification',
                        '--output', 'result.json', '--no_amp', '--batch_size', 16, '--num_workers', 0)
    assert_every_image_right(tmp_path / 'result.json', 'wds/toy', ADAPTER, 'epoch_1.pt')


@pytest.mark.e2e
def test_rankclip_checkpoint_linear_probe_on_cuda(tmp_path):
    """``--task linear_probe`` (train split ``train``, test split ``test``): CUDA only in CLIP_benchmark."""
    if not torch.cuda.is_available():
        pytest.skip("CLIP_benchmark's linear probe runs on CUDA only (assert device == 'cuda' in "
                    "clip_benchmark.metrics.linear_probe.evaluate)")
    images = toy_images(80, seed=2)
    labels = checkpoint_with_spread_predictions(PLAIN, tmp_path / 'epoch_64.pt', images)
    write_wds_split(tmp_path / 'toy', 'train', images[:40], labels[:40])
    write_wds_split(tmp_path / 'toy', 'test', images[40:], labels[40:])
    env = subprocess_env(OPEN_CLIP_RANK_MODEL_CONFIGS=TEST_CONFIG_DIR)
    if 'CUDA_VISIBLE_DEVICES' in os.environ:
        env['CUDA_VISIBLE_DEVICES'] = os.environ['CUDA_VISIBLE_DEVICES']
    else:
        env.pop('CUDA_VISIBLE_DEVICES')
    clip_benchmark_eval(tmp_path, '--model', PLAIN, '--pretrained', 'epoch_64.pt',
                        '--dataset', 'wds/toy', '--dataset_root', 'toy', '--task', 'linear_probe',
                        '--train_split', 'train', '--test_split', 'test', '--feature_root', 'features',
                        '--fewshot_epochs', 10, '--fewshot_lr', 0.1, '--output', 'result.json',
                        '--batch_size', 16, '--num_workers', 0, env=env)
    result = json.loads((tmp_path / 'result.json').read_text())
    assert (result['model'], result['pretrained'], result['task']) == (PLAIN, 'epoch_64.pt', 'linear_probe')
    metrics = result['metrics']  # the linear probe's keys: lp_acc1, lp_acc5, lp_mean_per_class_recall, ...
    assert 0.0 <= metrics['lp_acc1'] <= 1.0 and 0.0 <= metrics['lp_mean_per_class_recall'] <= 1.0, metrics
    # the image features of the checkpoint were computed and cached for the probe
    assert (tmp_path / 'features' / f'{PLAIN}-epoch_64.pt-wds_toy' / 'features_train.pt').is_file()


@pytest.mark.unit
def test_clip_benchmark_top_k_accuracy_is_numpy_2_4_safe():
    """CLIP_benchmark's ``accuracy`` calls float() on a 1-element array (NumPy >= 2.4 refuses): the plugin gives
    its zero-shot and linear-probe modules the same function without that, as it does for OpenCLIP's."""
    clip_benchmark_command()  # installed (the test extra)
    from clip_benchmark.metrics import linear_probe, zeroshot_classification
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.0, 0.0, 0.0],  # top-1 right
                           [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # label 1: second, within top-5
                           [-1.0, 0.1, 0.2, 0.3, 0.4, 0.5]])  # label 0: last, not in the top 5
    target = torch.tensor([1, 1, 0])
    for module in (zeroshot_classification, linear_probe):
        acc1, acc5 = module.accuracy(logits, target, topk=(1, 5))
        assert (acc1, acc5) == (pytest.approx(1 / 3), pytest.approx(2 / 3))
        assert isinstance(acc1, float)
        acc1, = module.accuracy(logits.float(), target.float(), topk=(1,))  # the linear probe's call
        assert acc1 == pytest.approx(1 / 3)
