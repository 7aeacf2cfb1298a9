"""Training: the checks, the job in named stages (:mod:`studyrec.train.loop`), its hooks, the optimizer
and steps, the memory estimate and the multi-process setup."""
