"""The mechanics of plugging into OpenCLIP: the import hook (``_bootstrap``), the patches (``hook``), every
private OpenCLIP / torch touch (``compat``), the training flags (``flags``) and the start checks (``start_checks``).

Nothing here names a family, a loss or a sample type: it asks ``registry``.
"""
