"""`python -m serve.demo --export DIR`: the end of `make demo`. Starts `python -m serve` on a free
loopback port, sends one POST /recommend (a history of the export's most-trained items of one domain,
an hour apart), prints the request and the answer, and stops the server. Standard library only."""
from __future__ import annotations

import argparse
import gzip
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def _get(url: str, body: dict | None = None, timeout: float = 5.0) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def demo_request(export: Path) -> dict:
    with gzip.open(export / "items.jsonl.gz", "rt") as f:
        items = [r for r in map(json.loads, f) if r["servable"]]
    domain = items[0]["domain"]
    top = sorted((r for r in items if r["domain"] == domain), key=lambda r: -r["train_count"])[:5]
    now = int(time.time())
    return dict(history=[r["item_id"] for r in top], timestamps=[now - 3600 * (5 - i) for i in range(5)], k=5)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.demo", description=__doc__)
    p.add_argument("--export", required=True, help="export folder (python -m train export --out ...)")
    args = p.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "serve", "--export", args.export, "--port", str(port)])
    try:
        for _ in range(240):  # up to 60 s: the first forward pass loads and warms the program
            if server.poll() is not None:
                print(f"error: the server exited with status {server.returncode}", file=sys.stderr)
                return 1
            try:
                if _get(url + "/ready").get("ready"):
                    break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.25)
        body = demo_request(Path(args.export))
        print(f"POST {url}/recommend\n{json.dumps(body)}")
        print(json.dumps(_get(url + "/recommend", body), indent=2))
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
