"""Deepen a model: FlexiGPT's weight-shared repeats with adapters, and the LLaMA Pro and SOLAR baselines.

:mod:`prunext.extend.plans` decides where the new positions go (pure arithmetic),
:mod:`prunext.extend.methods` builds the model, :mod:`prunext.extend.recipe` is
the ``prunext extend`` command.
"""
