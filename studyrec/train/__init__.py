"""Training: the checks, the job in named stages (:mod:`studyrec.train.loop`: :mod:`~studyrec.train.job`
up to the compiled step, :mod:`~studyrec.train.fit` from there), its hooks, the optimizer and steps,
the memory estimate and the multi-process setup."""
