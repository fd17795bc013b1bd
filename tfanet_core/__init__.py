"""tfanet_core: the TFA-Net model library (features, model, scoring, training, bundle, predictor).

It depends on torch and the scientific stack only; MLOps integrations live in ``components/``.
"""

__version__ = "0.1.0"
