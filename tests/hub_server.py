"""A loopback Hugging Face Hub API server for tests: the real `huggingface_hub` client uploads to and downloads from it.

There is no official offline Hub and no commit dry-run, so to exercise the real client code end to end (`create_repo`,
`create_commit` with regular and LFS files, `hf_hub_download` / `from_pretrained`) the tests start this small server in
a thread (stdlib `http.server`) and point the client at it (`HfApi(endpoint=...)` in-process, `HF_ENDPOINT` for
subprocesses; set `HF_HUB_DISABLE_XET=1` so uploads use LFS instead of Xet). Files are kept on disk under `root`:
content-addressed blobs in `root/objects/`, one JSON per repository in `root/repos/` with its commits and file trees.

Implemented (model repos, branch `main` or a commit sha as revision):

- `POST /api/repos/create`, `GET /api/whoami-v2`, `GET /api/agent-harnesses` (client telemetry: empty registry)
- `POST /api/validate-yaml` (the README front matter must parse as a YAML mapping)
- `POST /api/models/{repo}/preupload/{rev}` (weights and files > 1 MB go through LFS, the rest inline)
- `POST /{repo}.git/info/lfs/objects/batch`, `PUT /lfs/upload/{oid}`, `POST /lfs/verify`
- `POST /api/models/{repo}/commit/{rev}` (NDJSON: header, file, lfsFile, deletedFile, deletedFolder)
- `GET /api/models/{repo}[/revision/{rev}]`, `GET /api/models/{repo}/tree/{rev}[/{path}]`,
  `POST /api/models/{repo}/paths-info/{rev}`, `GET /api/models/{repo}/refs`
- `HEAD|GET /{repo}/resolve/{rev}/{path}` with `ETag`, `X-Repo-Commit`, `Content-Length` (`X-Linked-*` for LFS files)

Writes need `Authorization: Bearer <token>` with a token in `tokens`; reads of private repositories too. Every request
is recorded in `server.requests` (method, path) so tests can assert what reached the server, and every request the
server does not implement is recorded in `server.unhandled` (and answered 404) so a new client call shows up clearly.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_THRESHOLD_BYTES = 1024 * 1024
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".npz")
REPO_ID = r"(?P<repo>[\w.\-]+/[\w.\-]+)"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Store:
    """Repositories, commits and blobs on disk, guarded by one lock."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.repos_dir = self.root / "repos"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.repos_dir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()

    # -- repositories -------------------------------------------------------------------------------------------
    def _repo_file(self, repo_id: str) -> Path:
        return self.repos_dir / (repo_id.replace("/", "--") + ".json")

    def get_repo(self, repo_id: str) -> dict[str, Any] | None:
        path = self._repo_file(repo_id)
        return json.loads(path.read_text()) if path.exists() else None

    def save_repo(self, repo: dict[str, Any]) -> None:
        path = self._repo_file(repo["id"])
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(repo, indent=1))
        tmp.replace(path)

    def resolve(self, repo: dict[str, Any], revision: str) -> str | None:
        """Commit sha of a branch name or a (full) commit sha."""
        if revision in repo["branches"]:
            return repo["branches"][revision]
        if revision in repo["commits"]:
            return revision
        return None

    # -- blobs --------------------------------------------------------------------------------------------------
    def blob_path(self, key: str) -> Path:
        return self.objects / key

    def put_blob(self, data: bytes) -> str:
        """Store a regular file under its git sha1; return it."""
        key = git_blob_sha1(data)
        self.blob_path(key).write_bytes(data)
        return key


class HubRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    # -- plumbing -----------------------------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence the default stderr log
        return

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None, head: bool = False) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})}, head)

    def _error(self, status: int, message: str, code: str | None = None, head: bool = False, **extra: str) -> None:
        headers = {"X-Error-Message": message, **extra}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers, head)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[len("Bearer ") :] if auth.startswith("Bearer ") else None

    def _authorized(self) -> bool:
        return self._token() in self.server.tokens

    def _base(self) -> str:
        return self.server.url

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        path, query = unquote(split.path), parse_qs(split.query)
        with self.server.lock_requests:
            self.server.requests.append((method, path))
        body = self._read_body() if method in ("POST", "PUT") else b""
        for route_method, pattern, handler in ROUTES:
            if route_method != method and not (route_method == "GET" and method == "HEAD"):
                continue
            match = re.fullmatch(pattern, path)
            if match:
                try:
                    handler(self, body=body, query=query, head=method == "HEAD", **match.groupdict())
                except Exception as exc:  # pragma: no cover - surfaced to the test through the client error
                    self._error(500, f"{type(exc).__name__}: {exc}")
                return
        with self.server.lock_requests:
            self.server.unhandled.append((method, self.path))
        self._error(404, f"Not implemented by the loopback Hub: {method} {path}", head=method == "HEAD")

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    # -- helpers ------------------------------------------------------------------------------------------------
    def _readable_repo(self, repo_id: str, head: bool = False) -> dict[str, Any] | None:
        repo = self.server.store.get_repo(repo_id)
        if repo is None or (repo["private"] and not self._authorized()):
            # Like the Hub: a private repo without access looks like a missing one.
            self._error(404 if repo is None else 401, f"Repository {repo_id} not found", "RepoNotFound", head=head)
            return None
        return repo

    def _writable_repo(self, repo_id: str) -> dict[str, Any] | None:
        if not self._authorized():
            self._error(401, "Invalid credentials in Authorization header")
            return None
        repo = self.server.store.get_repo(repo_id)
        if repo is None:
            self._error(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _tree(self, repo: dict[str, Any], revision: str, head: bool = False) -> tuple[str, dict] | None:
        sha = self.server.store.resolve(repo, revision)
        if sha is None:
            self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound", head=head)
            return None
        return sha, repo["commits"][sha]["files"]

    @staticmethod
    def _entry_json(path: str, info: dict[str, Any]) -> dict[str, Any]:
        entry = {"type": "file", "oid": info["git_oid"], "size": info["size"], "path": path}
        if info.get("lfs"):
            entry["lfs"] = {"oid": info["sha256"], "size": info["size"], "pointerSize": 134}
        return entry

    # -- repositories -------------------------------------------------------------------------------------------
    def create_repo(self, body: bytes, **_: Any) -> None:
        if not self._authorized():
            return self._error(401, "Invalid credentials in Authorization header")
        payload = json.loads(body or b"{}")
        if payload.get("type") not in (None, "model"):
            return self._error(400, "The loopback Hub only serves model repositories")
        namespace = payload.get("organization") or self.server.username
        repo_id = f"{namespace}/{payload['name']}"
        store = self.server.store
        with store.lock:
            if store.get_repo(repo_id) is not None:
                conflict = {"error": "You already created this model repo", "url": f"{self._base()}/{repo_id}"}
                return self._json(409, conflict)
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
            init_sha = hashlib.sha1(f"init {repo_id} {time.time_ns()}".encode()).hexdigest()
            # A new Hub repo holds one commit with a `.gitattributes`; ours starts with an empty tree.
            repo = {
                "id": repo_id,
                "private": private,
                "createdAt": now,
                "branches": {"main": init_sha},
                "commits": {init_sha: {"parent": None, "title": "initial commit", "files": {}, "date": now}},
                "history": [init_sha],
            }
            store.save_repo(repo)
        self._json(200, {"url": f"{self._base()}/{repo_id}", "name": repo_id, "id": repo_id})

    def agent_harnesses(self, **_: Any) -> None:
        # Best-effort user-agent telemetry of huggingface_hub >= 2.x: an empty registry detects no agent.
        self._json(200, {"standardEnvVars": [], "harnesses": {}})

    def whoami(self, **_: Any) -> None:
        if not self._authorized():
            return self._error(401, "Invalid credentials in Authorization header")
        self._json(200, {"type": "user", "name": self.server.username, "orgs": [], "auth": {"type": "access_token"}})

    def model_info(
        self, repo: str, revision: str = "main", head: bool = False, query: dict | None = None, **_: Any
    ) -> None:
        repo_data = self._readable_repo(repo, head)
        if repo_data is None:
            return
        resolved = self._tree(repo_data, revision, head)
        if resolved is None:
            return
        sha, files = resolved
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo.encode()).hexdigest()[:24],
            "id": repo,
            "modelId": repo,
            "author": repo.split("/")[0],
            "sha": sha,
            "private": repo_data["private"],
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "createdAt": repo_data["createdAt"],
            "lastModified": repo_data["commits"][sha]["date"],
            "siblings": [{"rfilename": path} for path in sorted(files)],
        }
        if (query or {}).get("blobs", ["false"])[0].lower() in ("1", "true"):  # `model_info(files_metadata=True)`
            for sibling in info["siblings"]:
                entry = self._entry_json(sibling["rfilename"], files[sibling["rfilename"]])
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if "lfs" in entry:
                    sibling["lfs"] = {"sha256": entry["lfs"]["oid"], "size": entry["size"], "pointerSize": 134}
        if "config.json" in files:
            try:
                config = json.loads(self.server.store.blob_path(files["config.json"]["blob"]).read_bytes())
                info["config"] = {k: config[k] for k in ("architectures", "model_type", "auto_map") if k in config}
            except ValueError:
                pass
        self._json(200, info, head=head)

    def list_refs(self, repo: str, **_: Any) -> None:
        repo_data = self._readable_repo(repo)
        if repo_data is None:
            return
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
            for name, sha in repo_data["branches"].items()
        ]
        self._json(200, {"branches": branches, "converts": [], "tags": []})

    def list_tree(self, repo: str, revision: str, path: str | None = None, query: dict | None = None, **_: Any) -> None:
        path = path or ""
        repo_data = self._readable_repo(repo)
        if repo_data is None:
            return
        resolved = self._tree(repo_data, revision)
        if resolved is None:
            return
        _, files = resolved
        recursive = (query or {}).get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        entries, folders = [], set()
        for file_path in sorted(files):
            if not file_path.startswith(prefix):
                continue
            rest = file_path[len(prefix) :]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            if recursive:
                parts = rest.split("/")[:-1]
                folders.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
            entries.append(self._entry_json(file_path, files[file_path]))
        if prefix and not entries and not folders:
            return self._error(404, f"{path} does not exist on {revision}", "EntryNotFound")
        folder_entries = [
            {"type": "directory", "oid": git_blob_sha1(f.encode()), "size": 0, "path": f} for f in folders
        ]
        self._json(200, sorted(folder_entries, key=lambda e: e["path"]) + entries)

    def paths_info(self, repo: str, revision: str, body: bytes, **_: Any) -> None:
        repo_data = self._readable_repo(repo)
        if repo_data is None:
            return
        resolved = self._tree(repo_data, revision)
        if resolved is None:
            return
        _, files = resolved
        content_type = self.headers.get("Content-Type", "")
        if "json" in content_type:
            paths = json.loads(body or b"{}").get("paths", [])
        else:  # form-encoded `paths=a&paths=b`
            paths = parse_qs(body.decode()).get("paths", [])
        self._json(200, [self._entry_json(p, files[p]) for p in paths if p in files])

    # -- upload ---------------------------------------------------------------------------------------------------
    def validate_yaml(self, body: bytes, **_: Any) -> None:
        content = json.loads(body or b"{}").get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.DOTALL)
        if match is None:
            return self._json(200, {"warnings": [{"message": "empty or missing yaml metadata in repo card"}]})
        try:
            metadata = yaml.safe_load(match.group(1))
        except yaml.YAMLError as exc:
            return self._json(400, {"errors": [{"message": f"YAML does not parse: {exc}"}]})
        if not isinstance(metadata, dict):
            return self._json(400, {"errors": [{"message": "YAML metadata must be a mapping"}]})
        self._json(200, {"errors": [], "warnings": []})

    def preupload(self, repo: str, revision: str, body: bytes, **_: Any) -> None:
        repo_data = self._writable_repo(repo)
        if repo_data is None:
            return
        resolved = self._tree(repo_data, revision)
        if resolved is None:
            return
        _, files = resolved
        out = []
        for item in json.loads(body)["files"]:
            lfs = item["size"] > LFS_THRESHOLD_BYTES or item["path"].endswith(LFS_SUFFIXES)
            existing = files.get(item["path"])
            remote_oid = None
            if existing is not None:
                remote_oid = existing["sha256"] if existing.get("lfs") else existing["git_oid"]
            out.append(
                {"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                 "oid": remote_oid}
            )
        self._json(200, {"files": out, "commitOid": resolved[0]})

    def lfs_batch(self, repo: str, body: bytes, **_: Any) -> None:
        if self._writable_repo(repo) is None:
            return
        payload = json.loads(body)
        if payload.get("operation") != "upload":
            return self._error(400, "The loopback Hub only accepts LFS uploads through the batch API")
        objects = []
        for obj in payload["objects"]:
            oid, size = obj["oid"], obj["size"]
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            blob = self.server.store.blob_path(oid)
            if not (blob.exists() and blob.stat().st_size == size):
                entry["actions"] = {
                    "upload": {"href": f"{self._base()}/lfs/upload/{oid}", "header": {}},
                    "verify": {"href": f"{self._base()}/lfs/verify", "header": {}},
                }
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                   {"Content-Type": "application/vnd.git-lfs+json"})

    def lfs_upload(self, oid: str, body: bytes, **_: Any) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, f"Uploaded content does not match the sha256 oid {oid}")
        path = self.server.store.blob_path(oid)
        tmp = path.with_name(path.name + f".{threading.get_ident()}.part")
        tmp.write_bytes(body)
        tmp.replace(path)
        with self.server.lock_requests:
            self.server.lfs_uploads.append(oid)
        self._send(200)

    def lfs_verify(self, body: bytes, **_: Any) -> None:
        payload = json.loads(body)
        blob = self.server.store.blob_path(payload["oid"])
        if not blob.exists() or blob.stat().st_size != payload["size"]:
            return self._error(404, f"LFS object {payload['oid']} was not uploaded")
        self._json(200, {})

    def commit(self, repo: str, revision: str, body: bytes, query: dict | None = None, **_: Any) -> None:
        store = self.server.store
        with store.lock:
            repo_data = self._writable_repo(repo)
            if repo_data is None:
                return
            if (query or {}).get("create_pr"):
                return self._error(400, "The loopback Hub does not implement pull requests")
            if revision not in repo_data["branches"]:
                return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            parent = repo_data["branches"][revision]
            files = dict(repo_data["commits"][parent]["files"])
            header: dict[str, Any] = {}
            for line in body.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    header = value
                    if value.get("parentCommit") and not parent.startswith(value["parentCommit"]):
                        return self._error(412, "A commit has happened since. Please refresh and try again.")
                elif key == "file":
                    if value.get("encoding") != "base64":
                        return self._error(400, f"Unsupported encoding {value.get('encoding')!r}")
                    data = base64.b64decode(value["content"])
                    blob = store.put_blob(data)
                    files[value["path"]] = {"blob": blob, "git_oid": blob, "size": len(data), "lfs": False,
                                            "sha256": hashlib.sha256(data).hexdigest()}
                elif key == "lfsFile":
                    blob = store.blob_path(value["oid"])
                    if not blob.exists():
                        return self._error(400, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                    size = blob.stat().st_size
                    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{value['oid']}\nsize {size}\n"
                    files[value["path"]] = {"blob": value["oid"], "git_oid": git_blob_sha1(pointer.encode()),
                                            "size": size, "lfs": True, "sha256": value["oid"]}
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        return self._error(404, "A file with this name doesn't exist", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: f for p, f in files.items() if not p.startswith(prefix)}
                else:
                    return self._error(400, f"Unsupported commit operation {key!r}")
            if not header.get("summary"):
                return self._error(400, "A commit needs a summary")
            now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
            sha = hashlib.sha1(json.dumps([parent, header, sorted(files.items()), time.time_ns()]).encode()).hexdigest()
            repo_data["commits"][sha] = {"parent": parent, "title": header["summary"], "files": files, "date": now,
                                         "description": header.get("description", "")}
            repo_data["branches"][revision] = sha
            repo_data["history"].append(sha)
            store.save_repo(repo_data)
            with self.server.lock_requests:
                self.server.commits.append(
                    {"repo": repo, "oid": sha, "title": header["summary"], "files": sorted(files)}
                )
        self._json(200, {"commitUrl": f"{self._base()}/{repo}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None,
                         "success": True})

    # -- download -------------------------------------------------------------------------------------------------
    def resolve(self, repo: str, revision: str, path: str, head: bool = False, **_: Any) -> None:
        repo_data = self._readable_repo(repo, head)
        if repo_data is None:
            return
        resolved = self._tree(repo_data, revision, head)
        if resolved is None:
            return
        sha, files = resolved
        info = files.get(path)
        if info is None:
            return self._error(404, f"Entry not found: {path}", "EntryNotFound", head=head, **{"X-Repo-Commit": sha})
        blob = self.server.store.blob_path(info["blob"]).read_bytes()
        etag = info["sha256"] if info.get("lfs") else info["git_oid"]
        headers = {"Content-Type": "application/octet-stream", "ETag": f'"{etag}"', "X-Repo-Commit": sha,
                   "Accept-Ranges": "bytes"}
        if info.get("lfs"):
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(blob))})
        range_header = self.headers.get("Range")
        if range_header and not head:
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header.strip())
            if match:
                start = int(match.group(1))
                end = int(match.group(2)) if match.group(2) else len(blob) - 1
                headers["Content-Range"] = f"bytes {start}-{end}/{len(blob)}"
                return self._send(206, blob[start : end + 1], headers)
        self._send(200, blob, headers, head=head)


ROUTES: list[tuple[str, str, Any]] = [
    ("POST", r"/api/repos/create", HubRequestHandler.create_repo),
    ("GET", r"/api/whoami-v2", HubRequestHandler.whoami),
    ("GET", r"/api/agent-harnesses", HubRequestHandler.agent_harnesses),
    ("POST", r"/api/validate-yaml", HubRequestHandler.validate_yaml),
    ("POST", rf"/api/models/{REPO_ID}/preupload/(?P<revision>[^/]+)", HubRequestHandler.preupload),
    ("POST", rf"/api/models/{REPO_ID}/commit/(?P<revision>[^/]+)", HubRequestHandler.commit),
    ("POST", rf"/{REPO_ID}\.git/info/lfs/objects/batch", HubRequestHandler.lfs_batch),
    ("PUT", r"/lfs/upload/(?P<oid>[0-9a-f]{64})", HubRequestHandler.lfs_upload),
    ("POST", r"/lfs/verify", HubRequestHandler.lfs_verify),
    ("GET", rf"/api/models/{REPO_ID}", HubRequestHandler.model_info),
    ("GET", rf"/api/models/{REPO_ID}/revision/(?P<revision>[^/]+)", HubRequestHandler.model_info),
    ("GET", rf"/api/models/{REPO_ID}/refs", HubRequestHandler.list_refs),
    ("GET", rf"/api/models/{REPO_ID}/tree/(?P<revision>[^/]+)(?:/(?P<path>.*))?", HubRequestHandler.list_tree),
    ("POST", rf"/api/models/{REPO_ID}/paths-info/(?P<revision>[^/]+)", HubRequestHandler.paths_info),
    ("GET", rf"/{REPO_ID}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", HubRequestHandler.resolve),
]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    store: _Store
    tokens: set[str]
    username: str
    url: str
    requests: list[tuple[str, str]]
    unhandled: list[tuple[str, str]]
    commits: list[dict[str, Any]]
    lfs_uploads: list[str]
    lock_requests: threading.Lock


class LoopbackHub:
    """Start with `with LoopbackHub(tmp_path) as hub:`; `hub.url` is the endpoint, `hub.token` a valid write token."""

    def __init__(self, root: str | Path, token: str = "hf_loopback_test_token", username: str = "tester") -> None:
        self.root = Path(root)
        self.token = token
        self.username = username
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "LoopbackHub":
        httpd = _Server(("127.0.0.1", 0), HubRequestHandler)
        httpd.store = _Store(self.root)
        httpd.tokens = {self.token}
        httpd.username = self.username
        httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
        httpd.requests, httpd.unhandled, httpd.commits, httpd.lfs_uploads = [], [], [], []
        httpd.lock_requests = threading.Lock()
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, name="loopback-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "LoopbackHub":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def _server(self) -> _Server:
        if self._httpd is None:
            raise RuntimeError("The loopback Hub is not running; call start() first.")
        return self._httpd

    @property
    def url(self) -> str:
        return self._server.url

    @property
    def requests(self) -> list[tuple[str, str]]:
        return list(self._server.requests)

    @property
    def unhandled(self) -> list[tuple[str, str]]:
        return list(self._server.unhandled)

    @property
    def commits(self) -> list[dict[str, Any]]:
        return list(self._server.commits)

    @property
    def lfs_uploads(self) -> list[str]:
        return list(self._server.lfs_uploads)

    def repo_files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of a repository at a revision, read straight from the server's disk."""
        store = self._server.store
        repo = store.get_repo(repo_id)
        if repo is None:
            raise KeyError(repo_id)
        sha = store.resolve(repo, revision)
        return {p: store.blob_path(i["blob"]).read_bytes() for p, i in repo["commits"][sha]["files"].items()}


if __name__ == "__main__":  # manual use: python tests/hub_server.py /tmp/hub
    import sys

    hub = LoopbackHub(sys.argv[1] if len(sys.argv) > 1 else "hub_data").start()
    print(f"HF_ENDPOINT={hub.url} token={hub.token}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        hub.stop()
