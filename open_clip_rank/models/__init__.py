"""Rank models: the protocol every family follows (``base``), tower token extraction (``towers``),
weight loading (``checkpoint``) and one module per family (``adapter``, with ``adapter_layers``)."""
from .base import RankModel, RankOutput, RankTexts, unwrap
