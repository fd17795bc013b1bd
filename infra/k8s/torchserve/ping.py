"""Readiness probe: GET /ping with the inference key (token auth also guards /ping in TorchServe 0.12).

python ping.py [KEY_FILE] [PING_URL]    # defaults: the pod's key file and port; exit 0 only when Healthy
"""

import json
import sys
import urllib.request
from pathlib import Path

key_file = sys.argv[1] if len(sys.argv) > 1 else "/home/model-server/work/key_file.json"
url = sys.argv[2] if len(sys.argv) > 2 else "http://127.0.0.1:8080/ping"
key = json.loads(Path(key_file).read_text())["inference"]["key"]
request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
with urllib.request.urlopen(request, timeout=5) as response:
    sys.exit(0 if json.load(response).get("status") == "Healthy" else 1)
