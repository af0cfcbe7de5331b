"""Measuring rank models: ranking metrics (``metrics``), validation inside OpenCLIP's loop (``validation``),
and each sample type's metrics, pictures and rank-CLI report (``rank``, ``ordinal``).
"""
