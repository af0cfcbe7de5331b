"""Files: atomic writes (``atomic``), checkpoint damage and resume (``checkpoints``), image files (``images``)."""
