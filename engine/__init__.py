"""Training engine for on-policy self-distillation with adaptive teacher exposure: ``python -m engine.train``.

The step is ``trainer`` (``Trainer.step``: rollout, exposure, teacher and student scoring, loss, update, controller),
its run ``run`` (run directory, metrics, evaluations, checkpoints, signals), its command line ``train``; the
options are ``config`` (read by ``invocation``, declared as ``options`` says). docs/engine.md ("The house") draws
every module, the layers their imports follow, and who calls whom during one step.
"""
