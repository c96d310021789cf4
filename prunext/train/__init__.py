"""``prunext train``: continued pretraining of pruned/extended models on DeepSpeed ZeRO-3.

- :mod:`prunext.train.recipe`: the verb (checks, setup, the step loop, saving).
- :mod:`prunext.train.dsconfig`: DeepSpeed configs: read (hjson), check against the CLI, fill.
- :mod:`prunext.train.data`: token budget, packed blocks, the per-rank data order.
- :mod:`prunext.train.trainable`: what ``--trainable`` trains.
- :mod:`prunext.train.schedule`: warmup + cosine/linear/constant learning rate.
- :mod:`prunext.train.loop`: one optimizer step and one evaluation pass on the engine.
- :mod:`prunext.train.objective`: the loss: LM, logit distillation from a teacher, or both.
- :mod:`prunext.train.checkpoints`: checkpoints whose ``latest`` names only complete tags.
- :mod:`prunext.train.metrics`: ``metrics.jsonl``, MFU, wandb.
- :mod:`prunext.train.dist`: process-group set-up under torchrun, deepspeed or plain python.

See docs/training.md.
"""
