"""`python -m serve.demo --export DIR`: the end of `make demo`. Starts `python -m serve` on a free
loopback port, sends one POST /recommend (a history of the export's most-trained items of one domain,
an hour apart) and, when the model has query tokens, one POST /search (the same history + a query made of
two words of another item's title), prints requests and answers, and stops the server. Standard library
only."""
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
    body = dict(history=[r["item_id"] for r in top], timestamps=[now - 3600 * (5 - i) for i in range(5)], k=5)
    config = json.loads((export / "config.json").read_text())
    if domain in config["domains"] and (config.get("num_domains", 1) > 1 or config.get("within_domain")):
        body["domain"] = domain  # the export needs (or ranks by) the request's domain
    return body


def demo_search(export: Path, body: dict) -> dict | None:
    """The /recommend body + a query from the title of the first item outside it (None: no query tokens)."""
    if not (export / "queries.json").exists():
        return None
    with gzip.open(export / "items.jsonl.gz", "rt") as f:
        other = next(r for r in map(json.loads, f) if r["servable"] and r["item_id"] not in body["history"])
    return dict(body, query=" ".join(other["title"].lower().split()[:2]))


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
        search = demo_search(Path(args.export), body)
        if search is not None:
            print(f"POST {url}/search\n{json.dumps(search)}")
            print(json.dumps(_get(url + "/search", search), indent=2))
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
