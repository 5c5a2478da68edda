"""One-off experiments behind the model card's selection text (seed ensembles, paired AUROC
comparison, input-size probe). They run from a source checkout with the ``[train]`` extra and
are not part of the installed package (``pyproject.toml`` excludes them)."""
