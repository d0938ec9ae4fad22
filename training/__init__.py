"""Offline side of beltsort: scene simulator front-end, datasets, fine-tuning,
evaluation and the transfer-learning comparison. Needs the ``[train]`` extra."""
