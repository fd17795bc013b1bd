"""Serving: the TorchServe handler, its archive, a management/inference client and the parity check.

``payload`` (request parsing, responses) and ``handler`` are all that runs inside TorchServe;
``archive``, ``torchserve`` and ``parity`` run in the pipeline's deploy step and in tests.
"""
