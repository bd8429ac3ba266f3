"""Test doubles for the Hugging Face Hub: a cache filled in huggingface_hub's own layout, and a server on
127.0.0.1 implementing the endpoints ``HfApi.create_repo`` / ``upload_folder`` call, recording what it receives.

Uploads take the route huggingface_hub 0.36 takes against the real Hub (file:line in its installed source):

1. ``POST /api/models/{repo}/preupload/{rev}`` (``_commit_api.py:746``): the server says ``lfs`` or ``regular`` per
   file. The Hub says ``lfs`` for what a new repo's default ``.gitattributes`` tracks (``*.bin``,
   ``*.safetensors``, ...) and for large files; this server does the same (:data:`LFS_SUFFIXES`, :data:`LFS_MIN_SIZE`).
2. For the ``lfs`` files, ``POST /{repo}.git/info/lfs/objects/batch`` (``lfs.py:150-171``), offering the transfers
   ``basic``, ``multipart`` and, when hf_xet is installed, ``xet`` (``_commit_api.py:378-382``). The answer's
   ``transfer`` picks the route (``lfs.py:179``, ``_commit_api.py:410``): ``xet`` hands the files to hf_xet, which
   speaks Xet's CAS protocol (chunking, xorbs, shards) to the CAS server named by
   ``/api/models/{repo}/xet-write-token/{rev}`` (``_commit_api.py:527-660``, ``utils/_xet.py:157``); anything else
   keeps the LFS route. This server answers ``basic``, as the Hub does for clients and repos not on Xet: an object
   it already has gets no ``actions`` (``_commit_api.py:488-496``); a new one gets an ``upload`` href (a pre-signed
   storage URL on the Hub) and a ``verify`` href.
3. ``PUT`` of the bytes to the upload href, with no Hub token (``lfs.py:309-328``; ``http_backoff`` retries 500,
   502, 503, 504 five times). This server keeps the bytes by oid only if their sha256 and size are the ones the batch
   announced. When the upload action's header has a ``chunk_size`` (the Hub's answer for large files; here
   ``multipart_chunk``), each slice is PUT to its numbered URL and the parts' ETags are POSTed to the href
   (``lfs.py:244-256``, ``331-363``).
4. ``POST`` of ``{"oid", "size"}`` to the verify href with the Hub token (``lfs.py:258-267``): 404 when nothing was
   stored for the oid.
5. ``POST /api/models/{repo}/commit/{rev}``, ndjson (``hf_api.py:4296-4320``, ``_commit_api.py:909-928``): ``file``
   lines carry base64 content, ``lfsFile`` lines only ``{path, algo, oid, size}``; a commit naming an oid the
   server does not hold is refused (400) and records nothing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

# what a new Hub repo's default .gitattributes sends to LFS (the weight and archive formats among them)
LFS_SUFFIXES = (".bin", ".safetensors", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".msgpack", ".npy", ".npz",
                ".pkl", ".pickle", ".gz", ".zip", ".zst", ".tar", ".parquet", ".arrow")
LFS_MIN_SIZE = 10 * 1024 * 1024  # and any file this large


def is_lfs_path(path: str, size: int = 0) -> bool:
    return path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE


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
    """``with FakeHub() as hub:`` → ``hub.url`` for HF_ENDPOINT; ``hub.commits`` the commits received (``files``:
    path → bytes, LFS ones resolved from the stored objects; ``lfs_files``: path → oid of those sent as ``lfsFile``),
    ``hub.requests`` every (method, path, headers) seen, ``hub.batches`` the LFS batch requests (repo, payload),
    ``hub.puts`` every storage PUT (oid, bytes received), ``hub.verified`` the oids verified, ``hub.objects`` the
    stored LFS objects ((repo, oid) → bytes).

    ``upload_status``: the storage PUT answers this HTTP status instead (403 an expired pre-signed URL, 500 a storage
    fault) and stores nothing. ``multipart_chunk``: objects larger than this are uploaded in parts of this size, each
    PUT to its own URL, then assembled by a completion POST (``lfs.py:331-363``, the Hub's route for large files);
    ``hub.completions`` records those POSTs."""

    def __init__(self, token: str | None = None, upload_status: int | None = None,
                 multipart_chunk: int | None = None):
        self.token = token
        self.upload_status = upload_status
        self.multipart_chunk = multipart_chunk
        self.completions: list[dict] = []
        self._parts: dict[tuple[str, str], dict[int, bytes]] = {}
        self.commits: list[dict] = []
        self.requests: list[tuple[str, str, dict]] = []
        self.repos: set[str] = set()
        self.batches: list[tuple[str, dict]] = []
        self.puts: list[tuple[str, bytes]] = []
        self.verified: list[str] = []
        self.objects: dict[tuple[str, str], bytes] = {}
        self._announced: dict[tuple[str, str], int] = {}  # (repo, oid) → size, from the batch requests

    def __enter__(self):
        hub = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _reply(self, code, obj, ctype="application/json"):
                body = obj.encode() if isinstance(obj, str) else json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype if not isinstance(obj, str) else "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while (n := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                        out += self.rfile.read(n)
                        self.rfile.readline()
                    self.rfile.readline()
                    return out
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
                if self.path.startswith("/api/complete_multipart?"):  # signed in its query, sent without the token
                    return self._complete(parse_qs(urlsplit(self.path).query), json.loads(body))
                if not self._authorized():
                    return self._reply(401, {"error": "Invalid credentials"})
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:3] == ["api", "repos", "create"]:
                    req = json.loads(body)
                    rid = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                    url = f"http://{self.headers['Host']}/{rid}"
                    if rid in hub.repos:  # with the url: create_repo(exist_ok=True) reads it (hf_api.py:3777)
                        return self._reply(409, {"error": "You already created this model repo", "url": url})
                    hub.repos.add(rid)
                    return self._reply(200, {"url": url})
                if parts[:2] == ["api", "validate-yaml"]:
                    return self._reply(200, {"errors": [], "warnings": []})
                if parts[:2] == ["api", "models"] and "preupload" in parts:
                    req = json.loads(body)
                    return self._reply(200, {"files": [
                        {"path": f["path"], "uploadMode": "lfs" if is_lfs_path(f["path"], f["size"]) else "regular",
                         "shouldIgnore": False} for f in req["files"]]})
                if ".git/info/lfs/objects/" in self.path:
                    rid, _, op = self.path.split("?")[0].strip("/").partition(".git/info/lfs/objects/")
                    return self._lfs(rid, op, json.loads(body))
                if parts[:2] == ["api", "models"] and "commit" in parts:
                    i = parts.index("commit")
                    rid, rev = "/".join(parts[2:i]), parts[i + 1]
                    lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
                    files = {ln["value"]["path"]: base64.b64decode(ln["value"]["content"])
                             for ln in lines if ln["key"] == "file"}
                    lfs = {ln["value"]["path"]: ln["value"] for ln in lines if ln["key"] == "lfsFile"}
                    for path, ptr in lfs.items():
                        data = hub.objects.get((rid, ptr["oid"]))
                        if ptr.get("algo") != "sha256" or data is None or len(data) != ptr.get("size"):
                            return self._reply(400, {"error": "Your push was rejected because an LFS pointer "
                                                     "pointed to a file that does not exist. Offending file: "
                                                     f"- {path}"})
                        files[path] = data
                    header = next(ln["value"] for ln in lines if ln["key"] == "header")
                    others = [ln["key"] for ln in lines if ln["key"] not in ("file", "lfsFile", "header")]
                    oid = hashlib.sha1(body).hexdigest()
                    hub.commits.append({"repo_id": rid, "revision": rev, "header": header, "files": files,
                                        "lfs_files": {p: v["oid"] for p, v in lfs.items()}, "other_keys": others})
                    return self._reply(200, {"commitUrl": f"http://{self.headers['Host']}/{rid}/commit/{oid}",
                                             "commitOid": oid, "pullRequestUrl": None})
                self._reply(404, {"error": f"not implemented in the fake: {self.path}"})

            def _lfs(self, rid, op, req):
                if op == "batch":
                    hub.batches.append((rid, req))
                    if req.get("operation") != "upload" or req.get("hash_algo", "sha256") != "sha256" \
                            or "basic" not in req.get("transfers", ["basic"]):
                        return self._reply(422, {"message": "the fake only serves basic sha256 uploads"})
                    host = f"http://{self.headers['Host']}"
                    objects = []
                    for o in req["objects"]:
                        oid, size = o["oid"], o["size"]
                        if (rid, oid) in hub.objects:  # already stored: no actions, nothing to upload
                            objects.append({"oid": oid, "size": size})
                            continue
                        hub._announced[(rid, oid)] = size
                        upload = {"href": f"{host}/lfs-storage/{rid}/{oid}?X-Amz-Expires=900"}
                        chunk = hub.multipart_chunk
                        if chunk and size > chunk:  # a part URL each, and the completion URL as the href
                            hub._parts[(rid, oid)] = {}
                            upload = {"href": f"{host}/api/complete_multipart?repo={rid}&oid={oid}&signature=s",
                                      "header": {"chunk_size": str(chunk), **{
                                          f"{i:05d}": f"{host}/lfs-storage/{rid}/{oid}?partNumber={i}&uploadId=u"
                                          for i in range(1, -(-size // chunk) + 1)}}}
                        objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                            "upload": upload, "verify": {"href": f"{host}/{rid}.git/info/lfs/objects/verify"}}})
                    multipart = any("chunk_size" in o.get("actions", {}).get("upload", {}).get("header", {})
                                    for o in objects)
                    return self._reply(200, {"transfer": "multipart" if multipart else "basic", "objects": objects},
                                       ctype="application/vnd.git-lfs+json")
                if op == "verify":
                    oid = req["oid"]
                    data = hub.objects.get((rid, oid))
                    if data is None:
                        return self._reply(404, {"error": f"No file uploaded for oid: {oid}"})
                    if len(data) != req["size"]:
                        return self._reply(422, {"error": f"size mismatch for oid {oid}"})
                    hub.verified.append(oid)
                    return self._reply(200, "OK")
                return self._reply(404, {"error": f"not implemented in the fake: {self.path}"})

            def do_PUT(self):
                """The storage behind the upload href: a pre-signed URL, so no Hub token (S3 refuses a second
                auth mechanism with 400)."""
                body = self._body()
                hub.requests.append(("PUT", self.path, dict(self.headers)))
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[0] != "lfs-storage" or len(parts) != 4:
                    return self._reply(404, {"error": f"not implemented in the fake: {self.path}"})
                rid, oid = "/".join(parts[1:3]), parts[3]
                part = parse_qs(urlsplit(self.path).query).get("partNumber")
                hub.puts.append((oid, body))
                if self.headers.get("authorization"):
                    return self._reply(400, {"error": "Only one auth mechanism allowed"})
                if hub.upload_status is not None:
                    return self._reply(hub.upload_status, {"error": "injected storage failure"})
                if (rid, oid) not in hub._announced or (part is not None) != ((rid, oid) in hub._parts):
                    return self._reply(403, {"error": "no such upload was announced for this oid"})
                if part is not None:  # one part: kept until the completion POST names it by its ETag
                    hub._parts[(rid, oid)][int(part[0])] = body
                elif not self._store(rid, oid, body):
                    return self._reply(400, {"error": "BadDigest: the content does not match its sha256 or size"})
                self.send_response(200)
                self.send_header("ETag", f'"{hashlib.md5(body).hexdigest()}"')
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _store(self, rid, oid, data) -> bool:
                """Keep ``data`` as object ``oid`` if it is the content the batch announced."""
                if hashlib.sha256(data).hexdigest() != oid or len(data) != hub._announced[(rid, oid)]:
                    return False
                hub.objects[(rid, oid)] = data
                return True

            def _complete(self, query, req):
                hub.completions.append(req)
                rid, oid = query["repo"][0], query["oid"][0]
                have = hub._parts.get((rid, oid), {})
                named = [(p["partNumber"], p["etag"]) for p in req.get("parts", [])]
                if req.get("oid") != oid or [n for n, _ in named] != list(range(1, len(have) + 1)) or any(
                        etag != f'"{hashlib.md5(have[n]).hexdigest()}"' for n, etag in named):
                    return self._reply(400, {"error": "InvalidPart: the parts do not match the ones uploaded"})
                if not self._store(rid, oid, b"".join(have[n] for n, _ in named)):
                    return self._reply(400, {"error": "BadDigest: the content does not match its sha256 or size"})
                return self._reply(200, {})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
