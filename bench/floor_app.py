"""The floor: the least a Flask app forwarding through requests can cost.

No keys, limits, accounting or logs: one view that sends the body upstream
with the real key and streams the answer back. bench/run.py runs W1 and W2
through it under the shipped gunicorn.conf.py, as the proxy, so the table
shows what the fixed shape (gunicorn, Flask, requests) costs before any of
the proxy's own work.
"""

import os
import threading

import requests
from flask import Flask, Response, request

app = Flask(__name__)
# gunicorn.conf.py's hooks look for the folder where uploads are spooled.
app.config["DATA_DIR"] = os.environ["FLOOR_DATA_DIR"]
UPSTREAM_URL = os.environ["FLOOR_UPSTREAM_URL"]
UPSTREAM_KEY = os.environ["FLOOR_UPSTREAM_KEY"]
NOT_FORWARDED = {"host", "authorization", "content-length", "connection"}
_local = threading.local()


@app.get("/health")
def health():
    return "ok"


@app.post("/v1/<path:subpath>")
def forward(subpath):
    adapter = getattr(_local, "adapter", None)
    if adapter is None:
        adapter = _local.adapter = requests.adapters.HTTPAdapter()

    prepared = requests.PreparedRequest()
    prepared.prepare(
        method="POST",
        url=f"{UPSTREAM_URL}/v1/{subpath}",
        headers={
            **{
                name: value
                for name, value in request.headers.items()
                if name.lower() not in NOT_FORWARDED
            },
            "Authorization": f"Bearer {UPSTREAM_KEY}",
        },
        data=request.get_data(),
    )
    upstream = adapter.send(prepared, stream=True, timeout=(10, 600))
    return Response(
        iter(lambda: upstream.raw.read1(64 * 1024, decode_content=True), b""),
        status=upstream.status_code,
        content_type=upstream.headers.get("content-type"),
    )
