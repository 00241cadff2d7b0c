"""The training recipe: one loop (:mod:`~potstill.distill.train.recipe`), its data path,
student building, checkpoints and loss curves."""
