"""OrdinalCLIP family: parity with the official runner/learners, the model contract, config and data errors."""
import json

import pytest
import torch
import torch.nn.functional as F

import open_clip
from helpers import fixture_path
from open_clip_rank.data import RankDataError
from open_clip_rank.data.ordinal_dataset import OrdinalDataset, load_ordinal_table
from open_clip_rank.losses.ordinal import OrdinalLoss, ordinal_ce_loss, ordinal_kl_loss
from open_clip_rank.models.ordinal import OrdinalCLIP, OrdinalTargets
from open_clip_rank.models.ordinal_prompts import OrdinalCfg, interpolation_weights

pytestmark = pytest.mark.unit

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def build(**ordinal):
    cfg = dict(TINY, ordinal_cfg=dict({'num_ranks': 6, 'num_context_tokens': 4}, **ordinal))
    torch.manual_seed(0)
    return OrdinalCLIP(cfg['embed_dim'], cfg['vision_cfg'], cfg['text_cfg'], ordinal_cfg=cfg['ordinal_cfg']).eval()


# --- parity with the official code -------------------------------------------------------------------

def test_interpolation_weights_match_the_official_learner():
    """Equal wherever the official weights are defined; where its Gaussian underflows to 0/0 = NaN (ranks far
    from every base rank), ours is the limit: all weight on the nearest base rank(s)."""
    ref = torch.load(fixture_path('reference_ordinalclip.pt'), weights_only=False)
    assert len(ref['interpolation_weights']) == 12
    for key, expected in ref['interpolation_weights'].items():
        kind, base, ranks = key.rsplit('_', 2)
        got = interpolation_weights(kind, int(base[len('base'):]), int(ranks[len('ranks'):]))
        defined = torch.isfinite(expected).all(dim=-1)
        assert defined.all() or kind == 'normal', key
        torch.testing.assert_close(got[defined], expected[defined], rtol=0, atol=1e-6, msg=key)
        assert torch.isfinite(got).all() and torch.allclose(got.sum(-1), torch.ones(len(got)))
        if not defined.all():
            positions = torch.linspace(0, int(ranks[5:]) - 1, int(base[4:]))
            distance = (torch.arange(len(got))[:, None] - positions).abs()
            nearest = distance == distance.min(-1, keepdim=True).values  # ties: a rank midway between two
            assert torch.allclose((got * nearest).sum(-1)[~defined], torch.ones(int((~defined).sum())))


def test_ce_and_kl_match_the_official_runner():
    ref = torch.load(fixture_path('reference_ordinalclip.pt'), weights_only=False)
    logits, labels = ref['logits'], ref['labels']
    assert abs(ordinal_ce_loss(logits, labels).item() - ref['losses']['ce_loss'].item()) < 1e-6
    assert abs(ordinal_kl_loss(logits, labels).item() - ref['losses']['kl_loss'].item()) < 1e-6
    losses = OrdinalLoss()(ordinal_logits=logits, targets=labels, output_dict=True)
    assert set(losses) == {'ordinal_ce_loss', 'ordinal_kl_loss'}
    total = ref['losses']['ce_loss'] + ref['losses']['kl_loss']
    assert abs(sum(losses.values()).item() - total.item()) < 1e-5


def test_kl_drops_absent_rank_slots():
    logits = torch.randn(4, 5)
    labels = torch.tensor([0, 0, 3, 3])
    # only slots 0 and 3 are present: the mean of their two KLs
    per_slot = []
    for r in (0, 3):
        target = ((labels == r).float() * 10).softmax(0)
        per_slot.append((target * (target.log() - logits[:, r].log_softmax(0))).sum())
    assert torch.allclose(ordinal_kl_loss(logits, labels), torch.stack(per_slot).mean(), atol=1e-6)


def test_accumulated_micro_batches_keep_the_step_batch_of_the_kl_term():
    """OpenCLIP's --accum-freq path concatenates the micro-batches' outputs: the loss is the mean of per-micro-batch
    losses (each KL over its own batch, as the official runner's step), not one KL over all of them."""
    torch.manual_seed(0)
    logits, labels = torch.randn(12, 5), torch.randint(0, 5, (12,))
    accumulated = OrdinalLoss(micro_batch_size=4)(ordinal_logits=logits, targets=labels, output_dict=True)
    per_step = [OrdinalLoss()(ordinal_logits=logits[i:i + 4], targets=labels[i:i + 4], output_dict=True)
                for i in (0, 4, 8)]
    for name in ('ordinal_ce_loss', 'ordinal_kl_loss'):
        torch.testing.assert_close(accumulated[name], sum(step[name] for step in per_step) / 3)
    whole_kl = ordinal_kl_loss(logits, labels)
    assert not torch.allclose(accumulated['ordinal_kl_loss'], whole_kl)  # the batch statistic differs


# --- the model -------------------------------------------------------------------------------------

def test_forward_contract_and_frozen_logit_scale():
    model = build()
    images = torch.randn(3, 3, 32, 32)
    out = model(images)
    assert out['ordinal_logits'].shape == (3, 6) and out['text_features'].shape == (6, 32)
    probs = out['ordinal_logits'].softmax(-1)
    torch.testing.assert_close(out['expected_rank'], probs @ torch.arange(6.0))
    assert torch.equal(out['predicted_rank'], probs.argmax(-1))
    torch.testing.assert_close(out['ordinal_logits'],
                               out['logit_scale'] * out['image_features'] @ out['text_features'].T)
    assert torch.equal(out['logits'], out['ordinal_logits'])  # the official name reads as an alias
    assert not model.logit_scale.requires_grad
    assert 'targets' in model(images, OrdinalTargets(torch.tensor([0, 1, 5])))
    # OpenCLIP's one-tower contract: text alone gives plain text features (zero-shot works)
    text = model(text=open_clip.tokenize(['a photo'], context_length=16))
    assert text[1].shape == (1, 32)


def test_prototypes_are_the_text_tower_run_on_the_prompt_embeddings():
    """Reference: the official TextEncoder (embeddings + positions -> transformer -> ln_final -> eot -> proj)."""
    model = build(rank_tokens_position='middle', rank_specific_context=True)
    learner = model.prompt_learner
    embeds = learner.fill(model.token_embedding(learner.pseudo_tokens))
    x = embeds + model.positional_embedding
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    ref = x[torch.arange(6), learner.pseudo_tokens.argmax(-1)] @ model.text_projection
    torch.testing.assert_close(model.compute_prototypes(), F.normalize(ref, dim=-1))
    # learned embeddings sit between <sot> and '.': context split around the rank token (middle)
    assert learner.slot_index[0, 1:6].tolist() == [16, 17, 20, 18, 19]  # bank: 16 template, 4 context, rank


def test_rank_embeddings_interpolate_the_base_ranks():
    model = build(num_base_ranks=3, interpolation_type='linear')
    learner = model.prompt_learner
    ranks = learner.rank_token_embeds()
    expected = torch.einsum('rk,ktw->rtw', interpolation_weights('linear', 3, 6), learner.rank_embeds)
    torch.testing.assert_close(ranks, expected)
    # every rank mixes all base ranks (1 - d / (R - 1), normalised), as the official learner
    torch.testing.assert_close(ranks[0], (2 * learner.rank_embeds[0] + learner.rank_embeds[1]) / 3)


def test_prompt_pass_runs_once_per_forward_not_per_image(monkeypatch):
    model = build()
    calls = []
    original = model.encode_text
    monkeypatch.setattr(model, 'encode_text', lambda *a, **k: calls.append(a[0].shape) or original(*a, **k))
    model(torch.randn(5, 3, 32, 32))
    assert calls == [(6, 16)]


def test_word_initialisation_uses_token_embeddings_and_rank_names():
    model = build(prompt_learner='plain', init_context='the age is', rank_names=['zero', 'one', 'two', 'three',
                                                                                  'four', 'five'])
    tok = open_clip.tokenizer.SimpleTokenizer()
    weight = model.token_embedding.weight
    torch.testing.assert_close(model.prompt_learner.context_embeds.data, weight[tok.encode('the age is')])
    torch.testing.assert_close(model.prompt_learner.rank_embeds.data[3, 0], weight[tok.encode('three')[0]])


def test_base_clip_weights_load_towers_and_reinitialise_word_prompts(tmp_path):
    model = build(init_context='the age is')
    plain = open_clip.model.CLIP(TINY['embed_dim'], TINY['vision_cfg'], TINY['text_cfg'])
    path = tmp_path / 'base.pt'
    torch.save(plain.state_dict(), path)
    open_clip.load_checkpoint(model, str(path))
    ids = open_clip.tokenizer.SimpleTokenizer().encode('the age is')
    torch.testing.assert_close(model.prompt_learner.context_embeds.data, plain.token_embedding.weight[ids])
    torch.testing.assert_close(model.visual.attnpool.c_proj.weight, plain.visual.attnpool.c_proj.weight)


def test_frozen_prototypes_give_identical_predictions_without_the_text_tower(tmp_path):
    from open_clip_rank.inference import export_prototypes, load_prototypes
    model = build()
    images = torch.randn(4, 3, 32, 32)
    live = model(images)
    export_prototypes(model, tmp_path / 'protos.pt')
    fresh = build()
    fresh.load_state_dict(model.state_dict())
    load_prototypes(fresh, tmp_path / 'protos.pt')
    fresh.encode_text = None  # the text tower must not run
    frozen = fresh(images)
    assert torch.equal(frozen['ordinal_logits'], live['ordinal_logits'])
    assert torch.equal(frozen['predicted_rank'], live['predicted_rank'])
    other = build(num_ranks=7)
    with pytest.raises(ValueError, match=r'do not fit this model \(7 ranks'):
        load_prototypes(other, tmp_path / 'protos.pt')


@pytest.mark.parametrize('cfg, message', [
    ({'num_base_ranks': 1}, r"num_base_ranks=1: one base rank makes every rank's prompt identical"),
    ({'num_ranks': 6, 'num_base_ranks': 3, 'rank_names': ['a', 'b']},
     r"rank_names holds 2 rank names but num_base_ranks is 3"),
    ({'prompt_learner': 'plain', 'rank_names': ['a', 'b', 'c']}, r"rank_names holds 3 rank names but num_ranks is 6"),
    ({'interpolation': 'linear'}, r"unknown key\(s\) \['interpolation'\]"),
    ({'interpolation_type': 'cubic'}, r"interpolation_type='cubic'"),
    ({'rank_tokens_position': 'left'}, r"rank_tokens_position='left'"),
    ({'num_context_tokens': 20}, r"needs 24 tokens .* context_length is 16"),
])
def test_bad_ordinal_config_names_the_key(cfg, message):
    with pytest.raises(ValueError, match=message):
        build(**cfg)


def test_init_rank_path_count_mismatch_names_both_numbers(tmp_path):
    names = tmp_path / 'ranks.txt'
    names.write_text('young\nmiddle_aged\n')  # '_' reads as a space
    with pytest.raises(ValueError, match=r"ranks.txt holds 2 rank names but num_base_ranks is 3"):
        OrdinalCfg.from_dict({'init_rank_path': str(names)})
    cfg = OrdinalCfg.from_dict({'init_rank_path': str(names), 'num_base_ranks': 2})
    assert cfg.initial_rank_names() == ['young', 'middle aged']


def test_shipped_configs_build_and_derive_pretrained_tags():
    from open_clip_rank.models.ordinal import OrdinalCLIP as Cls
    for name in ('RN50-ordinal', 'ViT-B-32-ordinal', 'ViT-B-16-ordinal', 'convnext_base_w-ordinal',
                 'vgg16-RN50-ordinal'):
        with torch.device('meta'):
            model = open_clip.create_model(name, device='meta')
        assert isinstance(model, Cls) and model.num_ranks == 101
        assert model.prompt_learner.rank_embeds.shape[0] == 3
    assert 'openai' in open_clip.list_pretrained_tags_by_model('vgg16-RN50-ordinal')
    assert 'openai' in open_clip.list_pretrained_tags_by_model('RN50-ordinal')


# --- data ------------------------------------------------------------------------------------------

def _image(path):
    from PIL import Image
    Image.new('RGB', (8, 8)).save(path)
    return path


@pytest.mark.parametrize('label, message', [
    ('7', r"row 2: label 7 is outside \[0, 6\)"),
    ('2.5', r"row 2: label '2.5' is not an integer"),
    ('nan', r"row 2: label 'nan' is not an integer"),
    ('', r"row 2: label '' is not an integer"),
])
def test_bad_csv_labels_name_file_row_and_value(tmp_path, label, message):
    csv = tmp_path / 'train.csv'
    csv.write_text(f"filepath\tvalue\n{_image(tmp_path / 'a.png')}\t{label}\n")
    with pytest.raises(RankDataError, match=message):
        load_ordinal_table(str(csv), 6)


def test_list_files_resolve_relative_paths_and_pick_labels(tmp_path):
    _image(tmp_path / 'a.png')
    _image(tmp_path / 'b.png')
    listing = tmp_path / 'val.txt'
    listing.write_text('a.png 1 2 3\nb.png 4\n')
    table = load_ordinal_table(str(listing), 6, image_root=str(tmp_path))
    assert table.labels == [[1, 2, 3], [4]] and table.eval_labels() == [2, 4]  # the middle label in evaluation
    train = OrdinalDataset(table, lambda image: torch.zeros(1), train=True)
    assert {train[0][1] for _ in range(50)} == {1, 2, 3}  # a random one in training
    with pytest.raises(RankDataError, match=r"do not exist: .*a.png.*pass --image-root"):
        load_ordinal_table(str(listing), 6)
    listing.write_text('a.png\n')
    with pytest.raises(RankDataError, match=r"val.txt line 1: 'a.png' has no label"):
        load_ordinal_table(str(listing), 6, image_root=str(tmp_path))


def test_csv_without_label_column_names_it(tmp_path):
    csv = tmp_path / 'train.csv'
    csv.write_text(f"filepath\tage\n{_image(tmp_path / 'a.png')}\t3\n")
    with pytest.raises(RankDataError, match=r"has no column 'value' .* pass --csv-value-key"):
        load_ordinal_table(str(csv), 6)
    assert load_ordinal_table(str(csv), 6, value_key='age').labels == [[3]]


def test_timm_image_tower_with_another_models_text_tower_loads_text_weights_only(tmp_path, caplog):
    """The MORPH setup in small: a timm image tower + a CLIP text tower; base CLIP weights (whose image tower is a
    ResNet) load the text tower, and the timm tower keeps its own weights, saying so."""
    vision = {"timm_model_name": "resnet10t", "timm_model_pretrained": False, "timm_pool": "avg", "timm_proj": "",
              "image_size": 32}
    torch.manual_seed(0)
    model = OrdinalCLIP(32, vision, TINY['text_cfg'], ordinal_cfg={'num_ranks': 6, 'num_context_tokens': 4})
    tower_before = {k: v.clone() for k, v in model.visual.state_dict().items()}
    base = open_clip.model.CLIP(TINY['embed_dim'], TINY['vision_cfg'], TINY['text_cfg'])
    path = tmp_path / 'clip.pt'
    torch.save(base.state_dict(), path)
    with caplog.at_level('INFO'):
        open_clip.load_checkpoint(model, str(path))  # as create_model(pretrained=...) does
    assert torch.equal(model.text_projection, base.text_projection)
    assert all(torch.equal(v, tower_before[k]) for k, v in model.visual.state_dict().items())
    assert 'keep their timm initialisation' in caplog.text
    assert model(torch.randn(2, 3, 32, 32))['ordinal_logits'].shape == (2, 6)


def test_custom_text_towers_carry_ordinal_prompts_and_hf_towers_are_refused():
    from open_clip_rank.models.ordinal import OrdinalCustomTextCLIP
    text_cfg = dict(TINY['text_cfg'], no_causal_mask=True, proj_bias=True, pool_type='last')
    torch.manual_seed(0)
    model = OrdinalCustomTextCLIP(32, TINY['vision_cfg'], text_cfg, ordinal_cfg={'num_ranks': 5,
                                                                                 'num_context_tokens': 3})
    model.lock_text_tower()
    out = model(torch.randn(2, 3, 32, 32), OrdinalTargets(torch.tensor([0, 4])))
    OrdinalLoss()(**out).backward()
    assert model.prompt_learner.context_embeds.grad is not None and model.text.transformer.resblocks[0].mlp.c_fc.weight.grad is None
    with pytest.raises(ValueError, match='needs a CLIP BPE text tower'):
        OrdinalCustomTextCLIP(32, TINY['vision_cfg'], dict(hf_tokenizer_name='bert-base-uncased', hf_model_name='bert'),
                              ordinal_cfg={'num_ranks': 5})


def test_zero_shot_contract_on_an_ordinal_model():
    """OpenCLIP's zero-shot evaluation calls model(image=x)['image_features'] and model.encode_text."""
    model = build()
    images = torch.randn(2, 3, 32, 32)
    features = model(image=images)['image_features']
    torch.testing.assert_close(features, model.encode_image(images, normalize=True))
    assert model.encode_text(open_clip.tokenize(['a'], context_length=16)).shape == (1, 32)


def test_local_dir_config_builds_an_ordinal_model(tmp_path):
    cfg = open_clip.get_model_config('tiny-rn-ordinal')
    (tmp_path / 'open_clip_config.json').write_text(json.dumps({'model_cfg': cfg, 'preprocess_cfg': {}}))
    model = open_clip.create_model(f'local-dir:{tmp_path}')
    assert isinstance(model, OrdinalCLIP) and model.num_ranks == cfg['ordinal_cfg']['num_ranks']


def test_lock_image_and_lock_text_leave_only_the_prompts_trainable():
    """--lock-image --lock-text: prompt-only training (the paper's regime trains the image tower too)."""
    model = open_clip.create_model('tiny-rn-ordinal')
    model.lock_image_tower()
    model.lock_text_tower(0, False)  # as OpenCLIP's CLI calls it (no --lock-text-freeze-layer-norm)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith('prompt_learner.') for n in trainable), trainable
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith('prompt_learner.')}
