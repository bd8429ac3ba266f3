"""Test doubles for the Hugging Face Hub: a cache filled in huggingface_hub's own layout, and a server on
127.0.0.1 implementing the endpoints ``HfApi.create_repo`` / ``upload_folder`` call, recording what it receives."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def fill_cache(cache: Path, repo_id: str, files: dict[str, bytes], *, commit: str | None = None,
               ref: str = "main") -> Path:
    """Write ``files`` as huggingface_hub does: blobs/<sha256 or git-sha1>, snapshots/<commit>/<path> → symlink to
    the blob, refs/<ref> holding the commit. Returns the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = commit or hashlib.sha1(repr(sorted(files)).encode() + repo_id.encode()).hexdigest()
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        # regular files are named by their git blob sha1, LFS files by their sha256 (as huggingface_hub's etag)
        if rel.endswith((".bin", ".safetensors")):
            oid = hashlib.sha256(data).hexdigest()
        else:
            oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        blob = repo / "blobs" / oid
        blob.write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (len(Path(rel).parts) + 1)) / "blobs" / oid)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snap


class FakeHub:
    """``with FakeHub() as hub:`` → ``hub.url`` for HF_ENDPOINT; ``hub.commits`` the commits received (with the
    files decoded), ``hub.requests`` every (method, path, headers) seen."""

    def __init__(self, token: str | None = None):
        self.token = token
        self.commits: list[dict] = []
        self.requests: list[tuple[str, str, dict]] = []
        self.repos: set[str] = set()

    def __enter__(self):
        hub = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _reply(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _authorized(self) -> bool:
                return hub.token is None or self.headers.get("authorization") == f"Bearer {hub.token}"

            def do_GET(self):
                hub.requests.append(("GET", self.path, dict(self.headers)))
                self._reply(404, {"error": "not implemented in the fake"})

            def do_POST(self):
                body = self._body()
                hub.requests.append(("POST", self.path, dict(self.headers)))
                if not self._authorized():
                    return self._reply(401, {"error": "Invalid credentials"})
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:3] == ["api", "repos", "create"]:
                    req = json.loads(body)
                    rid = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                    if rid in hub.repos:
                        return self._reply(409, {"error": "You already created this model repo"})
                    hub.repos.add(rid)
                    return self._reply(200, {"url": f"http://{self.headers['Host']}/{rid}"})
                if parts[:2] == ["api", "validate-yaml"]:
                    return self._reply(200, {"errors": [], "warnings": []})
                if parts[:2] == ["api", "models"] and "preupload" in parts:
                    req = json.loads(body)
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False} for f in req["files"]]})
                if parts[:2] == ["api", "models"] and "commit" in parts:
                    i = parts.index("commit")
                    rid, rev = "/".join(parts[2:i]), parts[i + 1]
                    lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
                    files = {ln["value"]["path"]: base64.b64decode(ln["value"]["content"])
                             for ln in lines if ln["key"] == "file"}
                    header = next(ln["value"] for ln in lines if ln["key"] == "header")
                    others = [ln["key"] for ln in lines if ln["key"] not in ("file", "header")]
                    oid = hashlib.sha1(body).hexdigest()
                    hub.commits.append({"repo_id": rid, "revision": rev, "header": header, "files": files,
                                        "other_keys": others})
                    return self._reply(200, {"commitUrl": f"http://{self.headers['Host']}/{rid}/commit/{oid}",
                                             "commitOid": oid, "pullRequestUrl": None})
                self._reply(404, {"error": f"not implemented in the fake: {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
