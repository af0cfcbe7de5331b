"""Rank models: the protocol every family follows (``base``), tower token extraction (``towers``), weight loading
(``checkpoint``) and each family's modules (declared in ``builtin.py``): ``adapter`` (+ ``adapter_layers``,
``adapter_options``), ``ordinal`` (+ ``ordinal_prompts``); ``pair_reference`` restates the original pair head for
parity tests and benchmarks."""
from .base import RankModel, RankOutput, RankTexts, unwrap
