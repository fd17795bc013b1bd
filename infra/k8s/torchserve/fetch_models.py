"""Init container: copy this product's model archives from S3 into TorchServe's model store.

s3://$MODEL_BUCKET/torchserve/$PRODUCT/*.mar is what the deploy step publishes. An empty prefix is
not an error: the server then starts with no model and the deploy step registers one later.
"""

import os
import sys

from components.storage import download_dir, s3_client

bucket, product, store = os.environ["MODEL_BUCKET"], os.environ["PRODUCT"], sys.argv[1]
try:
    files = download_dir(s3_client(), bucket, f"torchserve/{product}", store, progress=False)
except FileNotFoundError:
    files = []
print(f"s3://{bucket}/torchserve/{product}: {len(files)} file(s) -> {store}", flush=True)
