"""What a model card says of a 'rank' training file (``SampleType.describe_data``): its instructions, categories and
the range of its targets (``python -m open_clip_rank.push_to_hf_hub``)."""
from .table import load_rank_table


def describe_rank_data(path, options) -> dict:
    """``{'rows', 'instructions', 'categories', 'targets': [lowest, highest]}`` of a rank CSV, read with training's
    reader (column names and separator from ``options``: the run's flags); its images need not exist here."""
    table = load_rank_table(path, img_key=options.csv_img_key, caption_key=options.csv_caption_key,
                            value_key=options.csv_value_key, category_key=options.csv_category_key, weight_key=None,
                            sep=options.csv_separator, require_category=False, require_value=False, check_files=False)
    described = {'rows': len(table), 'instructions': list(dict.fromkeys(table.captions))}
    if table.category_names != ['all']:  # 'all': the CSV has no category column
        described['categories'] = list(table.category_names)
    if table.values is not None:
        described['targets'] = [float(table.values.min()), float(table.values.max())]
        described['target_column'] = options.csv_value_key
    return described
