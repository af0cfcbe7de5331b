"""Sharing a model on the Hugging Face Hub: the folder, the training run it comes from, the model card."""
