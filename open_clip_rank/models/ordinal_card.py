"""The ordinal family's part of a model card (``RankFamily.model_card``, ``python -m open_clip_rank.push_to_hf_hub``):
what the model is and what its score means."""
from .ordinal_prompts import num_ranks_of_config


def ordinal_model_card(model_cfg, data=None) -> dict:
    """``{'description', 'score', 'pipeline_tag', 'details'}`` for an ``ordinal_cfg`` config; ``data``: the training
    file's description (the 'ordinal' sample type's ``describe_data``)."""
    block = (model_cfg or {}).get('ordinal_cfg') or {}
    ranks = num_ranks_of_config(block)
    context = block.get('init_context')
    seen = (data or {}).get('targets')
    labels = f"; the training data held labels {seen[0]:g} to {seen[1]:g}" if seen else ''
    details = {'Ranks': f"{ranks} (labels 0..{ranks - 1})"}
    if context:
        details['Prompt context (initial)'] = context
    baseline = block.get('prompt_learner') == 'baseline'  # the paper's CNN baseline: class prototypes, no prompts
    learned = f"learned class prototypes for {ranks} ordered ranks (the paper's CNN baseline, no text prompts)" \
        if baseline else f"learned prompts for {ranks} ordered ranks"
    over = f"the {ranks} learned class prototypes" if baseline else f"the {ranks} learned rank prompts"
    return {
        'description': (
            f"An OrdinalCLIP model (Li et al., NeurIPS 2022) built with open_clip_rank: {learned}. It takes no "
            f"instruction: every image gets an expected rank, the argmax rank and each rank's probability."),
        'score': (
            f"the expected rank, sum over r of r * p(r) with p the softmax over {over}: a "
            f"real number in [0, {ranks - 1}] in the units of the training labels (integer ranks "
            f"0..{ranks - 1}{labels}). Higher = a higher rank = ranked first (rank 1 is the highest score)."),
        'pipeline_tag': 'image-classification',
        'details': details,
    }
