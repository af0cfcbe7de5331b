"""Validation inside OpenCLIP's loop: metrics to the log, tensorboard and results.jsonl."""
import json
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
from scipy import stats

from open_clip_rank.data.rank import get_rank_data
from open_clip_rank.evaluation.validation import evaluate_ranking
from helpers import write_rank_csv

pytestmark = pytest.mark.unit


class FakeWriter:
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, name, value, step):
        self.scalars[name] = (value, step)


def test_evaluate_ranking_reports_every_metric(tmp_path):
    val = write_rank_csv(str(tmp_path), per_count=2, name='val.csv')
    args = SimpleNamespace(model='tiny-vit-adapter', loss_opt=None, train_data=None, val_data=val, csv_img_key='filepath', csv_caption_key='title',
                           csv_value_key='value', csv_category_key='cname', csv_weight_key='w', csv_separator='\t',
                           negative_ratio=0.0, batch_size=5, seed=0, rank=0, world_size=1, workers=0,
                           distributed=False, horovod=False, local_rank=0, device='cpu', precision='fp32',
                           val_frequency=1, epochs=3, save_logs=True, checkpoint_path=str(tmp_path), wandb=False)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms('tiny-vit-adapter')
    data = get_rank_data(args, (None, preprocess), tokenizer=open_clip.get_tokenizer('tiny-vit-adapter'))
    writer = FakeWriter()
    metrics = evaluate_ranking(model, data, 2, args, tb_writer=writer)
    assert metrics['epoch'] == 2 and metrics['num_samples'] == 24
    assert writer.scalars['val/srcc'] == (metrics['srcc'], 2)
    assert {'val/circle/krcc', 'val/square/pair_acc', 'val/plcc', 'val/mae'} <= set(writer.scalars)
    logged = json.loads((tmp_path / 'results.jsonl').read_text())
    assert logged == json.loads(json.dumps(metrics))
    # the reported SRCC is that of the model's scores, category by category
    table = data['val'].table
    with torch.no_grad():
        scores = torch.cat([model.rank_scores(images, texts.tokens) for images, texts in data['val'].dataloader])
    for c, name in enumerate(table.category_names):
        rows = table.category_ids == c
        expected = stats.spearmanr(scores.numpy()[rows], table.values[rows]).statistic
        assert np.isclose(metrics[f'{name}/srcc'], expected)
    assert evaluate_ranking(model, data, 2, SimpleNamespace(**{**vars(args), 'rank': 1})) == {}  # master only
