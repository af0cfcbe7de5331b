"""The adapter family's part of a model card (``RankFamily.model_card``, ``python -m open_clip_rank.push_to_hf_hub``):
what the model is and what its score means."""


def adapter_model_card(model_cfg, data=None) -> dict:
    """``{'description', 'score'}`` for an ``adapter_cfg`` config; ``data``: the training file's description (the
    'rank' sample type's ``describe_data``), whose target range gives the score its units."""
    data = data or {}
    targets = data.get('targets')
    scale = (f" (column '{data.get('target_column', 'value')}' of the training data, from {targets[0]:g} to "
             f"{targets[1]:g})" if targets else '')
    return {
        'description': (
            "A text-driven image ranker: an OpenCLIP model with the ranking-aware adapter of open_clip_rank "
            "(Yu et al., ICLR 2025). Given an instruction such as \"Rank the numbers of horse.\", it scores every "
            "image; sorting the images by score ranks them."),
        'score': (
            "the regression head's output for an (image, instruction) pair. Higher = ranked first (rank 1 is the "
            "highest score). An unbounded real number trained to match the training targets, so it is on their "
            f"scale and in their units{scale}. Scores under different instructions are not comparable; images are "
            "resized to the square input without cropping."),
    }
