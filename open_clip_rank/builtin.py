"""The built-in method families, losses and sample types: the one place that declares them (``registry.py``
registers them, in this order: sample types, losses, families).

Each entry names the modules that hold what it adds (``specs.py`` says what each hook is for); nothing here is
imported until it is used. A third-party family declares the same entries in its own package and registers them
from an entry point of the ``open_clip_rank.plugins`` group.
"""
from .specs import RankFamily, RankLoss, SampleType

# --- sample types ------------------------------------------------------------------------------------

SAMPLE_TYPES = (
    SampleType(
        name='rank',  # batches of one category (instruction) each, with targets and re-worded negatives
        data_builder='open_clip_rank.data.rank:get_rank_data',
        data_check='open_clip_rank.data.rank:check_rank_data',
        validation='open_clip_rank.evaluation.rank:ranking_validation',
        add_args='open_clip_rank.data.rank:add_rank_data_args',
        check_args='open_clip_rank.data.rank:check_rank_data_args',
        configure='open_clip_rank.data.rank:configure_rank_run',
        shard_fields=('value', 'category', 'caption'),
        val_shard_fields=('value', 'caption'),
        add_shard_args='open_clip_rank.data.rank:add_rank_shard_args',
        shard_records='open_clip_rank.data.rank:rank_shard_records',
        read_rows='open_clip_rank.data.rank:read_rank_rows',
        report='open_clip_rank.evaluation.rank:rank_report',
        card_metrics=('srcc', 'krcc', 'plcc', 'mae', 'pair_acc'),
        describe_data='open_clip_rank.data.rank_card:describe_rank_data',
        metric_goals={'srcc': 'max', 'krcc': 'max', 'plcc': 'max', 'mae': 'min', 'pair_acc': 'max',
                      'pair_acc_official': 'max'},  # evaluation/metrics.py METRIC_NAMES (mean over categories)
    ),
    SampleType(
        name='ordinal',  # shuffled batches of (image, integer rank label)
        data_builder='open_clip_rank.data.ordinal:get_ordinal_data',
        data_check='open_clip_rank.data.ordinal:check_ordinal_data',
        validation='open_clip_rank.evaluation.ordinal:ordinal_validation',
        add_args='open_clip_rank.data.ordinal_options:add_ordinal_data_args',
        check_args='open_clip_rank.data.ordinal_options:check_ordinal_data_args',
        shard_fields=('value',),
        val_shard_fields=('value',),
        add_shard_args='open_clip_rank.data.ordinal:add_ordinal_shard_args',
        shard_records='open_clip_rank.data.ordinal:ordinal_shard_records',
        add_cli_args='open_clip_rank.evaluation.ordinal:add_ordinal_cli_args',
        cli_transform='open_clip_rank.data.ordinal_options:official_cli_transform',
        read_rows='open_clip_rank.data.ordinal:read_ordinal_rows',
        report='open_clip_rank.evaluation.ordinal:ordinal_report',
        card_metrics=('mae_exp', 'acc_exp', 'mae_max', 'acc_max', 'ordinality'),
        describe_data='open_clip_rank.data.ordinal_card:describe_ordinal_data',
        metric_goals={'mae_exp': 'min', 'acc_exp': 'max', 'mae_max': 'min', 'acc_max': 'max',
                      'ordinality': 'max'},  # the official runner keeps the best by mae_max
    ),
)

# --- losses --------------------------------------------------------------------------------------------

LOSSES = (
    RankLoss(
        name='dual-head',  # pairs ordered by the adapter's pair head
        summary='dual-head: regression and pair heads trained (--pairwise ranks with the pair head)',
        builder='open_clip_rank.losses.ranking:build_dual_head_loss', sample_type='rank',
        forms_pairs=True, needs_pair_head=True,
        add_args='open_clip_rank.losses.ranking:add_ranking_loss_args',
        check_args='open_clip_rank.losses.ranking:check_ranking_loss_args',
    ),
    RankLoss(
        name='single-head',  # pairs ordered by score differences
        summary='single-head: pairs ordered by score differences; the pair head is untrained (do not use --pairwise)',
        builder='open_clip_rank.losses.ranking:build_single_head_loss', sample_type='rank', forms_pairs=True,
        add_args='open_clip_rank.losses.ranking:add_ranking_loss_args',
        check_args='open_clip_rank.losses.ranking:check_ranking_loss_args',
    ),
    RankLoss(
        name='ordinal',  # OrdinalCLIP: CE + batch KL over rank logits
        summary='ordinal: cross-entropy + KL over the rank logits, as OrdinalCLIP',
        builder='open_clip_rank.losses.ordinal:build_ordinal_loss', sample_type='ordinal',
        add_args='open_clip_rank.losses.ordinal:add_ordinal_loss_args',
        check_args='open_clip_rank.losses.ordinal:check_ordinal_loss_args',
    ),
    RankLoss(
        name='rankclip',  # RankCLIP pretraining of plain CLIP models on image-caption data
        summary='rankclip: CLIP\'s contrastive loss plus listwise ranking consistency (cross-modal and in-modal), '
                'as RankCLIP',
        builder='open_clip_rank.losses.rankclip:build_rankclip_loss',
        add_args='open_clip_rank.losses.rankclip:add_rankclip_args',
        check_args='open_clip_rank.losses.rankclip:check_rankclip_args',
        default_data='open_clip_rank.losses.rankclip:rankclip_default_data',
    ),
)

# --- families ------------------------------------------------------------------------------------------

FAMILIES = (
    RankFamily(
        name='adapter', config_key='adapter_cfg', suffix='-adapter', model_module='open_clip_rank.models.adapter',
        clip_class='RankAdapterCLIP', custom_text_class='RankAdapterCustomTextCLIP',
        default_loss='single-head',  # as the original training code
        sample_types=('rank',),
        base_aliases={
            'convnext_base_w_224': 'convnext_base_w',  # same towers as convnext_base_w, 224 px
            'ViT-B-16-plus': 'ViT-B-16-plus-240',  # ViT-B-16-plus has no weights; -240 does (pos-embed is resized)
        },
        add_args='open_clip_rank.models.adapter_options:add_adapter_args',
        check_args='open_clip_rank.models.adapter_options:check_adapter_args',
        start_check='open_clip_rank.models.adapter_options:check_adapter_start',
        after_epoch='open_clip_rank.models.adapter_options:report_feature_cache_use',
        model_card='open_clip_rank.models.adapter_card:adapter_model_card',
    ),
    RankFamily(
        name='ordinal', config_key='ordinal_cfg', suffix='-ordinal', model_module='open_clip_rank.models.ordinal',
        clip_class='OrdinalCLIP', custom_text_class='OrdinalCustomTextCLIP',
        default_loss='ordinal',  # CE + KL, as the official runner
        sample_types=('ordinal',), square_resize=False,
        base_aliases={'vgg16-RN50': 'RN50',  # the MORPH setup: CLIP RN50's text tower (the image tower from timm)
                      'RN50-baseline': 'RN50'},  # the official CNN baseline on CLIP RN50's towers
        num_ranks='open_clip_rank.models.ordinal_prompts:num_ranks_of_config',
        add_args='open_clip_rank.models.ordinal_options:add_ordinal_model_args',
        check_args='open_clip_rank.models.ordinal_options:check_ordinal_model_args',
        start_check='open_clip_rank.models.ordinal_options:check_ordinal_start',
        model_card='open_clip_rank.models.ordinal_card:ordinal_model_card',
    ),
)
