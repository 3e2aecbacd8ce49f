"""Training and validating the FPE model on a site's own cohort.

``manifest`` reads and validates the cohort CSV; ``cache`` runs every case through the one
preprocessing recipe of :mod:`inference.preprocess` and keeps the result on disk; ``train``
runs stratified k-fold cross-validation and writes one checkpoint per fold plus a fold
ensemble; ``evaluate`` reports a checkpoint's performance on a manifest; ``metrics``,
``calibrate`` and ``splits`` hold the statistics; ``phantoms`` makes a small, learnable
synthetic cohort for tests and smoke runs.
"""
