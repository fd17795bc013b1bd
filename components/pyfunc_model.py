"""The MLflow pyfunc model of a tfanet bundle, as an MLflow "model from code" file.

``components.tracking.log_model`` hands MLflow this file's *path*: MLflow copies it into the
logged model and executes it on load, so nothing is pickled (MLflow 3 warns against pickled
models: loading one runs arbitrary code) and the model does not depend on the ``components``
package being installed. It imports only ``tfanet_core``, whose source travels inside the
model (``code_paths``), next to the bundle (``artifacts["bundle"]``): one loader, the
bundle's, as everywhere else.

Input: a DataFrame with one column ``image``, each value a base64-encoded PNG/JPEG (or any
8-bit format Pillow reads) — bytes, not paths, because a served model never sees the
client's disk, and the same encoding as the TorchServe JSON request. Output: a DataFrame
with ``score`` (float), ``threshold`` (the bundle's calibrated image threshold) and
``is_anomalous`` (score > threshold), one row per input row.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel, PythonModelContext


class TfanetModel(PythonModel):
    """Wraps :class:`tfanet_core.predictor.Predictor`; the bundle arrives as the ``bundle`` artifact."""

    def load_context(self, context: PythonModelContext) -> None:
        from tfanet_core.predictor import Predictor

        self.predictor = Predictor.from_bundle(context.artifacts["bundle"])
        if self.predictor.threshold is None:
            raise ValueError("the bundle has no calibrated image threshold; calibrate it before logging the model")

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        from tfanet_core.data.images import open_image

        if "image" not in model_input:
            raise ValueError(f"expected a column 'image' of base64 PNG/JPEG strings, got columns {list(model_input)}")
        images = []
        for i, value in enumerate(model_input["image"]):
            try:
                data = base64.b64decode(value, validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise ValueError(f"image[{i}]: not base64; send base64.b64encode(png_bytes).decode()") from None
            images.append(open_image(Path(f"image[{i}]"), data))  # DataError (a ValueError) names the row
        predictions = self.predictor.predict(images) if images else []
        return pd.DataFrame(
            {
                "score": pd.Series([p.score for p in predictions], dtype="float64"),
                "threshold": pd.Series([p.threshold for p in predictions], dtype="float64"),
                "is_anomalous": pd.Series([bool(p.is_anomalous) for p in predictions], dtype="bool"),
            }
        )


mlflow.models.set_model(TfanetModel())
