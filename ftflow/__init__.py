"""ftflow: which base model, fine-tuning method and precision give the lowest perplexity on your test set.

The core package is plain Python (no Prefect): data, augmentation, the offline
model zoo, perplexity, training, distillation, selection and reporting. The
Prefect tasks in ``tasks/`` and flows in ``flows/`` wrap it.
"""

__version__ = "0.1.0"
