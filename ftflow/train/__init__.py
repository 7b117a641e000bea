"""Training: the typed jobs, one job run end to end, the Trainer glue and precision, optimizers, model cards."""
