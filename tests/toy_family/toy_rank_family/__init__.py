"""A fourth method family, defined only under tests/ and registered through the ``open_clip_rank.plugins`` entry point
(``toy_rank_family-0.1.dist-info`` beside this package): proof that a family is one module (``family.py``) plus
one registration (this file), with no edit to open_clip_rank.

The entry point's module stays light (no open_clip import at import time): importing open_clip is what loads the
plugins, so a registration module that imported it would be loaded half-initialised.
"""
from pathlib import Path

from open_clip_rank.registry import (RankFamily, RankLoss, SampleType, register_config_dir, register_family,
                                     register_loss, register_sample_type)

HERE = Path(__file__).resolve().parent.parent


def register():
    """The entry point: one registration for the family, its loss and its sample type."""
    register_config_dir(HERE / 'model_configs')
    me = 'toy_rank_family.family'
    register_sample_type(SampleType(
        name='toy', data_builder=f'{me}:get_toy_data', data_check=f'{me}:check_toy_data',
        validation=f'{me}:toy_validation', add_args=f'{me}:add_toy_data_args', check_args=f'{me}:check_toy_data_args',
        shard_fields=('value',), val_shard_fields=('value',), shard_records=f'{me}:toy_shard_records',
        read_rows=f'{me}:read_toy_rows', report=f'{me}:toy_report', metric_goals={'toy_srcc': 'max'}))
    register_loss(RankLoss(name='toy-mse', builder=f'{me}:build_toy_loss', sample_type='toy',
                           add_args=f'{me}:add_toy_loss_args', check_args=f'{me}:check_toy_loss_args'))
    register_family(RankFamily(
        name='toy', config_key='toy_cfg', suffix='-toy', model_module=me, clip_class='ToyCLIP',
        custom_text_class='ToyCLIP', default_loss='toy-mse', sample_types=('toy',)))
