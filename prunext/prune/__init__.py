"""The prune path: remove transformer blocks by importance (FlexiGPT and the depth baselines).

- :mod:`prunext.prune.importance`: block and window importance over calibration text.
- :mod:`prunext.prune.ratio`: how many blocks a ratio prunes, adapters and norms counted.
- :mod:`prunext.prune.replace`: which kept block replaces a pruned one; SVD adapter init.
- :mod:`prunext.prune.methods`: scores + weights -> plan + initialised model, per method.
- :mod:`prunext.prune.report`: ``prune_report.json``, tables, plots.
- :mod:`prunext.prune.recipe`: the ``prunext prune`` command.
"""
