"""Downstream evaluation of a pretrained checkpoint with few labels (``pretrain eval linear|knn``).

``features.py`` embeds labelled shards once (cached) with the checkpoint's frozen backbone, any
modality ``load_backbone`` serves; ``subsets.py`` draws class-balanced label subsets by seed;
``modes.py`` fits and scores the linear probe (hyper-parameters chosen on validation, never on
test) and kNN; ``subgroups.py`` reports accuracy and macro-F1 per subgroup of a metadata field
with bootstrap intervals and confusion matrices; ``report.py`` runs the grid of label fractions x
seeds x modes and writes the table, ``results.json``/``.csv``, a label-efficiency plot and the
subgroup report.
"""
