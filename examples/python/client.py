#!/usr/bin/env python3
"""Run one ComfyUI workflow through comfygate and download its images.

This is ComfyUI's standard API flow (script_examples/websockets_api_example.py)
with an API key added:

  1. open the WebSocket /ws?clientId=<uuid>, sending the key in a header
  2. POST /prompt with the same client_id
  3. read messages until {"type": "executing", "data": {"node": null, "prompt_id": <ours>}}
  4. GET /history/<prompt_id>
  5. GET /view for every output image

Needs the standard library plus websocket-client (`import websocket`):
Debian/Ubuntu package python3-websocket, or `pip install websocket-client`.

    COMFYGATE_URL=http://127.0.0.1:8188 COMFYGATE_API_KEY_FILE=keys.txt \\
        /usr/bin/python3 examples/python/client.py [workflow.json] [--out DIR]

The key comes from COMFYGATE_API_KEY, or from the first key in the file named
by COMFYGATE_API_KEY_FILE. The script exits non-zero on any failure.
"""

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid

try:
    import websocket  # websocket-client
except ImportError:
    sys.exit("client.py: the websocket-client package is missing "
             "(apt-get install python3-websocket, or pip install websocket-client)")

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = float(os.environ.get("COMFYGATE_TIMEOUT", "120"))  # seconds without a message


def read_key():
    """The key from COMFYGATE_API_KEY, else the first key line of COMFYGATE_API_KEY_FILE."""
    key = os.environ.get("COMFYGATE_API_KEY", "").strip()
    if key:
        return key
    path = os.environ.get("COMFYGATE_API_KEY_FILE")
    if path:
        with open(path, encoding="utf-8-sig") as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#"):
                    return line
    sys.exit("client.py: set COMFYGATE_API_KEY or COMFYGATE_API_KEY_FILE")


def load_workflow(path):
    """Accept either a whole /prompt request body ({"prompt": {...}, ...}) or
    a bare API-format graph as saved by ComfyUI's "Export (API)"."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data.get("prompt"), dict) and "class_type" not in data["prompt"]:
        return data
    return {"prompt": data}


class Gateway:
    def __init__(self, base_url, key):
        self.base = base_url.rstrip("/")
        # Authorization: Bearer works everywhere, the WebSocket included.
        self.headers = {"Authorization": "Bearer " + key}

    def request(self, method, path, body=None, query=None):
        url = self.base + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers = dict(self.headers)
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.read()
        except urllib.error.HTTPError as e:
            # comfygate's own errors (401, 413, 502) and ComfyUI's validation
            # errors (400 on /prompt) both carry a JSON body worth showing.
            detail = e.read().decode("utf-8", "replace")[:2000]
            raise SystemExit(f"client.py: {method} {path} failed: {e.code} {detail}")
        except urllib.error.URLError as e:
            raise SystemExit(f"client.py: cannot reach {self.base}: {e.reason}")

    def get_json(self, path, query=None):
        return json.loads(self.request("GET", path, query=query))

    def websocket(self, client_id):
        scheme = "wss" if self.base.startswith("https:") else "ws"
        url = scheme + self.base[self.base.index(":"):] + "/ws?" + urllib.parse.urlencode({"clientId": client_id})
        ws = websocket.WebSocket()
        ws.settimeout(TIMEOUT)
        # The header form keeps the key out of the URL. It also passes when
        # comfygate runs with --protect-ws.
        try:
            ws.connect(url, header=[f"{k}: {v}" for k, v in self.headers.items()])
        except (websocket.WebSocketException, OSError) as e:
            raise SystemExit(f"client.py: cannot open the WebSocket: {e}")
        return ws


def wait_for_prompt(ws, prompt_id):
    """Read messages until ComfyUI says our prompt is done; fail on an error."""
    while True:
        msg = ws.recv()
        if isinstance(msg, bytes):
            continue  # binary frames are previews; this example ignores them
        event = json.loads(msg)
        kind, data = event.get("type"), event.get("data") or {}
        if data.get("prompt_id") not in (None, prompt_id):
            continue  # another prompt's event
        if kind == "executing" and data.get("node") is not None:
            print(f"  running node {data['node']}")
        elif kind == "progress":
            print(f"  progress {data.get('value')}/{data.get('max')}")
        elif kind == "execution_error":
            raise SystemExit("client.py: ComfyUI reported an error: "
                             f"{data.get('exception_type')}: {data.get('exception_message')}")
        elif kind == "execution_interrupted":
            raise SystemExit("client.py: the prompt was interrupted")
        elif kind == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
            return  # finished; the history is written


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("workflow", nargs="?", default=os.path.join(HERE, "..", "workflow_api.json"))
    ap.add_argument("--out", default="comfygate-output", help="directory for the images")
    args = ap.parse_args()

    gw = Gateway(os.environ.get("COMFYGATE_URL", "http://127.0.0.1:8188"), read_key())

    health = gw.get_json("/health")
    print(f"gateway healthy: ComfyUI {health['version']} on {health['device']}, "
          f"queue {health['queue']['running']} running / {health['queue']['pending']} pending")

    client_id = str(uuid.uuid4())
    ws = gw.websocket(client_id)  # connect first, so no event is missed
    try:
        body = load_workflow(args.workflow)
        body["client_id"] = client_id  # decides which socket gets our events
        queued = json.loads(gw.request("POST", "/prompt", body=body))
        prompt_id = queued["prompt_id"]
        print(f"queued prompt {prompt_id}")
        wait_for_prompt(ws, prompt_id)
    except websocket.WebSocketTimeoutException:
        raise SystemExit(f"client.py: no message from ComfyUI for {TIMEOUT:.0f}s")
    finally:
        ws.close()

    entry = gw.get_json(f"/history/{prompt_id}").get(prompt_id)
    if not entry:
        raise SystemExit(f"client.py: /history/{prompt_id} is empty")
    status = entry.get("status", {}).get("status_str")
    if status != "success":
        raise SystemExit(f"client.py: prompt finished with status {status!r}")

    os.makedirs(args.out, exist_ok=True)
    saved = 0
    for node_id, output in entry.get("outputs", {}).items():
        for image in output.get("images", []):
            data = gw.request("GET", "/view", query={
                "filename": image["filename"],
                "subfolder": image.get("subfolder", ""),
                "type": image.get("type", "output"),
            })
            path = os.path.join(args.out, os.path.basename(image["filename"]))
            with open(path, "wb") as f:
                f.write(data)
            print(f"saved {path} ({len(data)} bytes) from node {node_id}")
            saved += 1
    if saved == 0:
        raise SystemExit("client.py: the prompt produced no image")
    print("done")


if __name__ == "__main__":
    main()
