"""Datasets for tfanet: reading images and masks, finding samples, the manifest, synthetic data.

Every problem with a user's files raises :class:`DataError` (a ``ValueError``) whose message
names the file and says what to do; the CLI prints it without a stack trace.
"""

from tfanet_core.data.images import (
    IMAGE_EXTENSIONS,
    DataError,
    image_to_tensor,
    is_image_file,
    load_mask,
    load_rgb,
    mask_to_array,
    mask_to_tensor,
    open_image,
    open_mask_image,
    to_rgb,
)
from tfanet_core.data.layouts import (
    GOOD,
    SPLITS,
    Sample,
    detect_layout,
    discover,
    find_orphan_masks,
    load_defects_config,
    split_validation,
)
from tfanet_core.data.manifest import Manifest, ManifestError, ManifestRow, build_manifest
from tfanet_core.data.synth import DEFECT_TYPES, PRODUCTS, generate

__all__ = [
    "DEFECT_TYPES",
    "GOOD",
    "IMAGE_EXTENSIONS",
    "PRODUCTS",
    "SPLITS",
    "DataError",
    "Manifest",
    "ManifestError",
    "ManifestRow",
    "Sample",
    "build_manifest",
    "detect_layout",
    "discover",
    "find_orphan_masks",
    "generate",
    "image_to_tensor",
    "is_image_file",
    "load_defects_config",
    "load_mask",
    "load_rgb",
    "mask_to_array",
    "mask_to_tensor",
    "open_image",
    "open_mask_image",
    "split_validation",
    "to_rgb",
]
