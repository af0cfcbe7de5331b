"""What a model card says of an 'ordinal' training file (``SampleType.describe_data``): its size and the labels it
holds (``python -m open_clip_rank.push_to_hf_hub``)."""
from .ordinal_dataset import load_ordinal_table


def describe_ordinal_data(path, options) -> dict:
    """``{'rows', 'targets': [lowest, highest label]}`` of an ordinal CSV or list file, read with training's reader
    (``options``: the run's flags and the model's ``num_ranks``); its images need not exist here."""
    table = load_ordinal_table(path, options.num_ranks, img_key=options.csv_img_key, value_key=options.csv_value_key,
                               sep=options.csv_separator, check_files=False, require_labels=False)
    described = {'rows': len(table)}
    labels = table.eval_labels()
    if labels:
        described['targets'] = [float(min(labels)), float(max(labels))]
        described['target_column'] = options.csv_value_key
    return described
