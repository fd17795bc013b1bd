"""The MLOps steps around ``tfanet_core``: validation, S3 storage, MLflow tracking and promotion, the local stack.

Importing this package switches off the usage telemetry of the tools it drives (MLflow,
great-expectations, and anything honouring ``DO_NOT_TRACK``): an inspection machine on a
factory network should not phone home because it trained a model. ``setdefault`` only, so a
value the user exported explicitly wins.
"""

import os

for _name, _value in (("MLFLOW_DISABLE_TELEMETRY", "true"), ("GX_ANALYTICS_ENABLED", "false"), ("DO_NOT_TRACK", "1")):
    os.environ.setdefault(_name, _value)
