"""--rank-feature-cache: hit / miss, invalidation, corrupt-cache rebuild, equality with the uncached path, refusals,
and a training run through OpenCLIP's main (tiny configs, CPU)."""
from types import SimpleNamespace
import argparse
import os
import re
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch

from helpers import TEST_CONFIG_DIR, call_main, free_port, subprocess_env, write_rank_csv
from open_clip_rank.data.cached import CachedRankDataset, collate_cached_rank_batch
from open_clip_rank.data.dataset import RankDataset, collate_rank_batch
from open_clip_rank.data.table import load_rank_table
from open_clip_rank.data.transforms import rank_transforms
from open_clip_rank.data.feature_cache import CachedImages, FeatureCacheError, build_cache, check_cacheable, open_cache
from open_clip_rank.integration.run_state import end_run, start_run
from open_clip_rank.models.adapter_options import check_feature_cache_args as validate_feature_cache_args

MODEL = 'tiny-vit-adapter'


@pytest.fixture(scope='module')
def csv_path(tmp_path_factory):
    return write_rank_csv(str(tmp_path_factory.mktemp('cachedata')), per_count=1)  # 12 rows


def _model(seed=0, strict=False, name=MODEL, image_eval=False):
    torch.manual_seed(seed)
    start_run(SimpleNamespace(strict_tower_lock=strict, lock_image_eval=image_eval))
    try:
        model, _, preprocess_val = open_clip.create_model_and_transforms(name)
        model.lock_image_tower()
    finally:
        end_run()
    return model, preprocess_val


def _args(cache_dir, dtype='fp16', model=MODEL):
    return argparse.Namespace(model=model, force_image_size=None, force_patch_dropout=None, force_quick_gelu=False,
                              precision='amp', rank=0, rank_feature_cache=str(cache_dir),
                              rank_feature_cache_dtype=dtype)


def _setup(csv_path, cache_dir, dtype='fp16', seed=0, strict=False, name=MODEL, image_eval=False):
    model, preprocess_val = _model(seed, strict, name, image_eval)
    table = load_rank_table(csv_path)
    _, transform = rank_transforms(preprocess_val)
    cache = build_cache(_args(cache_dir, dtype, name), model, table, transform)
    tokenizer = open_clip.get_tokenizer(name)
    dataset = CachedRankDataset(table, transform, tokenizer, cache.header_path)
    return model, table, transform, tokenizer, cache, dataset


def _batch(dataset, cache, keys, seed=0):
    torch.manual_seed(seed)
    return collate_cached_rank_batch([dataset[k] for k in keys], cache.header_path)


class TowerCalls:
    def __init__(self, model):
        self.count = 0
        model.visual.register_forward_hook(lambda *_: setattr(self, 'count', self.count + 1))


@pytest.mark.unit
def test_miss_then_hit_second_epoch_skips_the_tower(csv_path, tmp_path):
    model, table, _, _, cache, dataset = _setup(csv_path, tmp_path)
    calls = TowerCalls(model)
    epoch = [[(r, -1) for r in range(i, i + 4)] for i in range(0, len(table), 4)]
    for images, texts in (_batch(dataset, cache, keys) for keys in epoch):
        assert isinstance(images, CachedImages) and not images.hit.any() and images.pixels.shape[1] == 2
        model(images, texts)
    assert calls.count == len(epoch) and cache.num_complete() == len(table)
    calls.count = 0
    for seed in (1, 2):  # other flip views too: both views are stored
        for images, texts in (_batch(dataset, cache, keys, seed) for keys in epoch):
            assert images.hit.all() and images.pixels.numel() == 0
            model(images, texts)
    assert calls.count == 0
    # a new process's open (e.g. a resumed run) finds the entries complete
    _, _, _, _, again, _ = _setup(csv_path, tmp_path)
    assert again.header_path == cache.header_path and again.num_complete() == len(table)


def _uncached_batch(table, transform, tokenizer, images, keys):
    dataset = RankDataset(table, transform, tokenizer)
    samples = [dataset[k] for k in keys]
    pixels, texts = collate_rank_batch(samples)
    flips = images.views.bool()
    pixels[flips] = pixels[flips].flip(-1)
    return pixels, texts


def _forward_backward(model, images, texts):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same adapter dropout masks for both paths
    out = model(images, texts)
    (out['rank_scores'].sum() + out['pair_logits'].square().mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.unit
@pytest.mark.parametrize('dtype,tol', [('fp32', 1e-5), ('fp16', 2e-2)])
def test_outputs_and_gradients_equal_the_uncached_path(csv_path, tmp_path, dtype, tol):
    model, table, transform, tokenizer, cache, dataset = _setup(csv_path, tmp_path, dtype)
    assert model.visual.proj.requires_grad  # the official lock: visual.proj trains
    keys = [(0, -1), (3, -1), (7, 0), (10, -1)]  # (7, 0): a negative, caption re-worded
    for seed in (0, 5):  # the first fetch misses (tower run), the second hits (from the cache)
        images, texts = _batch(dataset, cache, keys, seed)
        assert bool(images.hit.all()) == (seed == 5)
        pixels, plain_texts = _uncached_batch(table, transform, tokenizer, images, keys)
        assert torch.equal(texts.tokens, plain_texts.tokens) and torch.equal(texts.targets, plain_texts.targets)
        cached_out, cached_grads = _forward_backward(model, images, texts)
        plain_out, plain_grads = _forward_backward(model, pixels, plain_texts)
        exact = tol if seed == 5 else 1e-5  # a miss uses the tower's own output
        for name in ('rank_scores', 'pair_logits', 'image_tokens'):
            torch.testing.assert_close(cached_out[name], plain_out[name], atol=exact, rtol=exact)
        assert 'visual.proj' in plain_grads and plain_grads.keys() == cached_grads.keys()
        for name, grad in plain_grads.items():
            torch.testing.assert_close(cached_grads[name], grad, atol=exact, rtol=exact)


@pytest.mark.unit
def test_timm_trunk_cached_outputs_equal_the_uncached_path(csv_path, tmp_path):
    # a timm tower (the paper's ConvNeXt family): its un-pooled trunk map is what is cached
    model, table, transform, tokenizer, cache, dataset = _setup(csv_path, tmp_path, 'fp32', name='tiny-convnext-adapter')
    model.eval()  # timm_drop / drop_path are 0; eval keeps the adapter's dropout out of the comparison
    keys = [(1, -1), (4, -1), (8, 0)]
    for seed in (0, 5):
        images, texts = _batch(dataset, cache, keys, seed)
        assert bool(images.hit.all()) == (seed == 5)
        pixels, plain_texts = _uncached_batch(table, transform, tokenizer, images, keys)
        cached_out, cached_grads = _forward_backward(model, images, texts)
        plain_out, plain_grads = _forward_backward(model, pixels, plain_texts)
        for name in ('rank_scores', 'pair_logits', 'image_tokens'):
            torch.testing.assert_close(cached_out[name], plain_out[name], atol=1e-5, rtol=1e-5)
        assert plain_grads and plain_grads.keys() == cached_grads.keys()
        for name, grad in plain_grads.items():
            torch.testing.assert_close(cached_grads[name], grad, atol=1e-5, rtol=1e-5)


def _config_with_stochastic_depth(tmp_path):
    # the paper's convnext_large_d_320 config has timm_drop_path 0.1: a frozen trunk in training mode is random
    import json
    config = json.loads((TEST_CONFIG_DIR / 'tiny-convnext-adapter.json').read_text())
    config['vision_cfg']['timm_drop_path'] = 0.5
    folder = tmp_path / 'configs'
    folder.mkdir()
    (folder / 'tiny-convnext-droppath-adapter.json').write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    return 'tiny-convnext-droppath-adapter'


@pytest.mark.unit
def test_stochastic_depth_is_refused_unless_the_locked_tower_runs_in_eval_mode(csv_path, tmp_path):
    name = _config_with_stochastic_depth(tmp_path)
    model, _ = _model(name=name)
    model.train()
    with pytest.raises(FeatureCacheError, match=r'visual\.trunk\..*drop_path.*DropPath.*--lock-image-eval'):
        check_cacheable(model)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # why: training mode drops residual branches at random
        assert not torch.equal(model.image_tower_features(pixels), model.image_tower_features(pixels))

    model, table, transform, tokenizer, cache, dataset = _setup(csv_path, tmp_path / 'c', 'fp32', name=name,
                                                                image_eval=True)
    model.train()  # what OpenCLIP's loop calls each epoch: the locked tower stays in eval mode
    assert model.training and not model.visual.training and model.adapter.training
    with torch.no_grad():
        assert torch.equal(model.image_tower_features(pixels), model.image_tower_features(pixels))
    keys = [(1, -1), (4, -1), (8, 0)]
    for seed in (0, 5):  # miss, then hit: both equal the uncached path in training mode
        images, texts = _batch(dataset, cache, keys, seed)
        pixels_, plain_texts = _uncached_batch(table, transform, tokenizer, images, keys)
        cached_out, _ = _forward_backward(model, images, texts)
        plain_out, _ = _forward_backward(model, pixels_, plain_texts)
        torch.testing.assert_close(cached_out['rank_scores'], plain_out['rank_scores'], atol=1e-5, rtol=1e-5)


@pytest.mark.unit
def test_lock_image_eval_flag_refusals():
    from open_clip_rank.models.adapter_options import check_lock_image_eval_args as validate_lock_image_eval_args
    base = dict(lock_image_eval=True, model=MODEL, lock_image=True, lock_image_unlocked_groups=0)
    validate_lock_image_eval_args(argparse.Namespace(**base))
    for change, message in (({'lock_image': False}, 'add --lock-image'),
                            ({'lock_image_unlocked_groups': 2}, 'without --lock-image-unlocked-groups'),
                            ({'model': 'ViT-B-32'}, 'adapter models')):
        with pytest.raises(ValueError, match=message):
            validate_lock_image_eval_args(argparse.Namespace(**{**base, **change}))


@pytest.mark.unit
def test_strict_lock_caches_too(csv_path, tmp_path):
    model, table, _, _, cache, dataset = _setup(csv_path, tmp_path, strict=True)
    assert not model.visual.proj.requires_grad
    images, texts = _batch(dataset, cache, [(0, -1), (1, -1)])
    assert model(images, texts)['rank_scores'].shape == (2,)


RN_ADAPTER = {
    "embed_dim": [32, 32],
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    "adapter_cfg": {"num_layers": 1, "d_model": 32, "n_head": 4, "num_learnable_text_tokens": 4,
                    "cross_attn_method": "cross-qkv", "reg_token_method": "cross-attn-sum",
                    "adapter_attention_pooler": "rank-attn", "n_reg_tokens": 4},
    "misc_cfg": {"model_version": "clip-adapter-v2"}
}


@pytest.mark.unit
def test_resnet_caches_the_layer4_map_before_visual_proj(csv_path, tmp_path):
    import json
    folder = tmp_path / 'configs'
    folder.mkdir()
    (folder / 'tiny-rn-cache-adapter.json').write_text(json.dumps(RN_ADAPTER))
    open_clip.add_model_config(folder)
    model, _, preprocess_val = open_clip.create_model_and_transforms('tiny-rn-cache-adapter')
    model.lock_image_tower()
    with pytest.raises(FeatureCacheError, match='--lock-image-freeze-bn-stats'):
        check_cacheable(model)  # BatchNorm with batch statistics: per-batch outputs, not cacheable
    model.lock_image_tower(freeze_bn_stats=True)
    table = load_rank_table(csv_path)
    _, transform = rank_transforms(preprocess_val)
    cache = build_cache(_args(tmp_path / 'cache', 'fp32', model='tiny-rn-cache-adapter'), model, table, transform)
    assert cache.entry_shape == (16 * 32, 2, 2)  # the layer-4 map, before the 1x1 visual_proj
    dataset = CachedRankDataset(table, transform, open_clip.get_tokenizer(MODEL), cache.header_path)
    keys = [(0, -1), (1, -1), (8, 0)]
    for seed in (0, 1):  # miss, then hit
        images, texts = _batch(dataset, cache, keys, seed)
        pixels, plain_texts = _uncached_batch(table, transform, open_clip.get_tokenizer(MODEL), images, keys)
        cached_out, cached_grads = _forward_backward(model, images, texts)
        plain_out, plain_grads = _forward_backward(model, pixels, plain_texts)
        torch.testing.assert_close(cached_out['rank_scores'], plain_out['rank_scores'], atol=1e-5, rtol=1e-5)
        assert 'visual_proj.weight' in plain_grads
        torch.testing.assert_close(cached_grads['visual_proj.weight'], plain_grads['visual_proj.weight'],
                                   atol=1e-5, rtol=1e-5)


def _key_folder(cache):
    return os.path.dirname(cache.header_path)


@pytest.mark.unit
def test_invalidation_by_config_weights_and_data(tmp_path):
    data = tmp_path / 'data'
    csv = write_rank_csv(str(data), per_count=1)
    cache_dir = tmp_path / 'cache'
    model, table, transform, tokenizer, cache, dataset = _setup(csv, cache_dir)
    model(*_batch(dataset, cache, [(0, -1), (1, -1)]))
    assert cache.num_complete() == 2
    base = _key_folder(cache)
    # the same everything: the same cache, reused
    assert _key_folder(_setup(csv, cache_dir)[4]) == base
    # other weights of the frozen tower
    assert _key_folder(_setup(csv, cache_dir, seed=1)[4]) != base
    # another model config
    other = _args(cache_dir, model='tiny-vit-adapter')
    other.force_image_size = 48
    assert _key_folder(build_cache(other, model, table, transform)) != base
    # another transform (e.g. other normalisation): what the tower saw differs
    from torchvision import transforms as T
    changed = T.Compose([*transform.transforms, T.Normalize(mean=[0.5] * 3, std=[0.5] * 3)])
    assert _key_folder(build_cache(_args(cache_dir), model, table, changed)) != base
    # another storage type
    assert _key_folder(_setup(csv, cache_dir, dtype='bf16')[4]) == base  # same key, the header's dtype differs:
    rebuilt = _setup(csv, cache_dir)[4]  # ... so it was rebuilt as bf16 and now rebuilt again as fp16, empty
    assert rebuilt.num_complete() == 0
    # the data: a changed CSV, a changed image
    with open(csv, 'a') as f:
        f.write('')
    os.utime(csv, ns=(1, 1))
    assert _key_folder(_setup(csv, cache_dir)[4]) != base
    image = table.paths[0]
    with open(image, 'ab') as f:
        f.write(b'\0')
    assert _key_folder(_setup(csv, cache_dir)[4]) not in (base,)


@pytest.mark.unit
def test_corrupt_entries_are_recomputed_and_corrupt_files_rebuilt(csv_path, tmp_path):
    model, table, _, _, cache, dataset = _setup(csv_path, tmp_path, dtype='fp32')
    keys = [(0, -1), (1, -1), (2, -1)]
    model(*_batch(dataset, cache, keys))
    good = np.array(cache.tokens[1])
    assert cache.num_complete() == 3
    # a flipped byte in entry 1: its checksum fails, so it is a miss (recomputed, rewritten), never used
    with open(cache.tokens_path, 'r+b') as f:
        f.seek(cache.tokens[0].nbytes + 5)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert open_cache(cache.header_path, writable=False).read(1, 0) is None
    calls = TowerCalls(model)
    images, texts = _batch(dataset, cache, keys)
    assert images.hit.tolist() == [True, False, True]
    model(images, texts)
    assert calls.count == 1 and np.allclose(np.array(cache.tokens[1]), good, atol=1e-5)  # batch of 1: float noise
    assert open_cache(cache.header_path, writable=False).read(1, 0) is not None
    # an entry whose completion marker was never written (a crash mid-write) is a miss
    cache.index[2, 1] = 0
    assert _batch(dataset, cache, keys)[0].hit.tolist() == [True, True, False]
    # a truncated data file or a damaged header: the cache is rebuilt empty
    with open(cache.tokens_path, 'r+b') as f:
        f.truncate(100)
    assert _setup(csv_path, tmp_path, dtype='fp32')[4].num_complete() == 0
    fresh = _setup(csv_path, tmp_path, dtype='fp32')
    fresh[0](*_batch(fresh[5], fresh[4], keys))
    with open(fresh[4].header_path, 'w') as f:
        f.write('{"format": 1, "key": ')
    assert _setup(csv_path, tmp_path, dtype='fp32')[4].num_complete() == 0


@pytest.mark.unit
def test_refusals(tmp_path):
    base = dict(rank_feature_cache=str(tmp_path), csv_dataset_sample_type='rank', lock_image=True,
                lock_image_unlocked_groups=0, dataset_type='csv', train_data='x.csv', force_patch_dropout=None)
    validate_feature_cache_args(argparse.Namespace(**base))
    for change, message in (({'lock_image': False}, '--lock-image'),
                            ({'lock_image_unlocked_groups': 1}, 'unlocked-groups'),
                            ({'csv_dataset_sample_type': 'ordinal'}, 'sample-type rank'),
                            ({'dataset_type': 'webdataset'}, 'shards'),
                            ({'force_patch_dropout': 0.5}, 'patch-dropout')):
        with pytest.raises(ValueError, match=message):
            validate_feature_cache_args(argparse.Namespace(**{**base, **change}))
    model = open_clip.create_model(MODEL)  # not locked: the tower trains
    with pytest.raises(FeatureCacheError, match='frozen image tower'):
        check_cacheable(model)
    model.lock_image_tower(unlocked_groups=2)  # 1 would unlock only visual.proj (a ViT's last group)
    with pytest.raises(FeatureCacheError, match='frozen image tower'):
        check_cacheable(model)


def _train(args, cwd, name, launcher=(sys.executable, '-m', 'open_clip_train.main')):
    cmd = [*launcher, '--model', MODEL, '--dataset-type', 'csv',
           '--csv-dataset-sample-type', 'rank', '--batch-size', '8', '--lr', '1e-3', '--warmup', '1',
           '--workers', '1', '--seed', '0', '--name', name, '--epochs', '2', '--lock-image', '--lock-text', *args]
    env = subprocess_env(OPEN_CLIP_RANK_MODEL_CONFIGS=str(TEST_CONFIG_DIR))
    return subprocess.run(cmd, env=env, cwd=str(cwd), capture_output=True, text=True, timeout=300)


@pytest.mark.e2e
def test_training_run_with_the_cache(tmp_path):
    train = write_rank_csv(str(tmp_path / 'data'), per_count=2)  # 24 rows
    cache_dir = tmp_path / 'cache'
    first = _train(['--train-data', train, '--rank-feature-cache', str(cache_dir)], tmp_path, 'first')
    assert first.returncode == 0, first.stderr[-3000:]
    log = (tmp_path / 'logs' / 'first' / 'out.log').read_text()
    assert 'building it (no cache yet)' in log and 'Train Epoch: 1' in log
    # --lock-image-eval: the tiny ViT has no random module, so its outputs (and the cache key) are unchanged
    second = _train(['--train-data', train, '--rank-feature-cache', str(cache_dir), '--lock-image-eval'],
                    tmp_path, 'second')
    assert second.returncode == 0, second.stderr[-3000:]
    log = (tmp_path / 'logs' / 'second' / 'out.log').read_text()
    assert 'reusing it' in log and ' 0 of 24 entries complete' not in log
    assert 'Image tower locked in eval mode (--lock-image-eval)' in log
    # each epoch says how many images came from the cache; the second run's come mostly from it
    usage = re.findall(r'Feature cache, epoch (\d): (\d+) of (\d+) images from the cache', log)
    assert [int(e) for e, _, _ in usage] == [0, 1], log[-2000:]
    assert all(int(seen) > 0 for _, _, seen in usage) and int(usage[-1][1]) > 0
    from open_clip_train.main import main  # a refused start stops in parse_args: no child process needed
    refused = call_main(main, ['--model', MODEL, '--dataset-type', 'csv', '--csv-dataset-sample-type', 'rank',
                               '--train-data', train, '--lock-image', '--lock-text', '--rank-feature-cache', cache_dir,
                               '--lock-image-unlocked-groups', '1', '--name', 'refused'], cwd=tmp_path)
    assert refused.returncode == 2 and '--rank-feature-cache' in refused.stderr
    assert not (tmp_path / 'logs' / 'refused').exists()


@pytest.mark.e2e
@pytest.mark.distributed
def test_two_process_ddp_with_the_cache(tmp_path):
    train = write_rank_csv(str(tmp_path / 'data'), per_count=2)  # 24 rows
    cache_dir = tmp_path / 'cache'
    launcher = (sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(free_port()),
                '-m', 'open_clip_train.main')
    result = _train(['--train-data', train, '--rank-feature-cache', str(cache_dir), '--dist-backend', 'gloo',
                     '--loss-opt', 'dual-head'], tmp_path, 'ddp', launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    (folder,) = cache_dir.iterdir()  # one key; one file set per process rank, each filled by its process
    for rank in (0, 1):
        cache = open_cache(str(folder / f'rank{rank}.json'), writable=False)
        assert 0 < cache.num_complete() <= 24
