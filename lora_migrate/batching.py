"""``lora-migrate batch``: convert many adapters, in parallel, resumably, with a JSON-lines report.

A manifest is JSON lines (or CSV with the same columns): ``source`` (a path, relative to the manifest's folder, or
an ``hf://`` id), ``to``, optional ``from``, ``name`` (the output subfolder; derived from the source when absent)
and ``options`` (an object: ``adapter``, ``safetensors``, ``keep_head``, ``verify``, ``model_type``,
``allow_nonfinite``, ``num_layers``, ``initial_adapter``, ``base_model`` — paths relative to the manifest's folder;
in CSV a JSON string). A glob of folders instead of a manifest converts each folder (``--to`` / ``--from`` apply).

Each item is converted by :func:`run_item` (a top-level function, so any executor can ship it) into ``OUT/<name>``
through the usual temp-folder-and-rename. Its record is appended to the report as soon as it finishes, so a run
that is killed keeps what it finished; a rerun skips an item whose previous record is ``ok`` with the same key
(the hash of the source's files, the conventions, the options and this tool's version) and whose output exists.
At the end the report is rewritten with exactly one record per item.
"""

from __future__ import annotations

import csv
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field

from .errors import LoraMigrateError

OPTIONS = {"adapter": (str, type(None)), "safetensors": bool, "keep_head": bool, "verify": bool,
           "model_type": (str, type(None)), "allow_nonfinite": bool, "num_layers": (int, type(None)),
           "initial_adapter": (str, type(None)), "base_model": (str, type(None))}
PATH_OPTIONS = ("initial_adapter", "base_model")  # relative to the manifest's folder, like ``source``
COLUMNS = {"source", "to", "from", "name", "options"}
LOCK_NAME = ".lora-migrate-batch.lock"


class BatchItem(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    source: str
    to: str
    from_: str | None = Field(default=None, alias="from")
    name: str
    options: dict = {}


class ItemRecord(BaseModel):
    """One line of the report."""

    name: str
    source: str
    to: str
    status: Literal["ok", "failed", "skipped"]
    key: str | None  # what "finished" means on a rerun: hash of inputs + conventions + options + tool version
    output: str
    convention: str | None = None  # detected (or --from) source convention
    target: str | None = None
    rules: list[str] = []  # the rules applied, in order (from the plan)
    modules: int = 0
    max_rel_fro: float | None = None
    max_rel_probe: float | None = None
    tolerance: float | None = None
    seconds: float = 0.0
    bytes: int = 0
    error: str | None = None
    exit_code: int = 0  # what `convert` would have exited with: 1 check failed, 2 bad input


class BatchResult(BaseModel):
    out: str
    report: str
    executor: str
    workers: int
    items: list[ItemRecord]
    seconds: float

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.items)

    @computed_field
    @property
    def ok(self) -> bool:
        return self.count("failed") == 0


# ---------------------------------------------------------------------------------------------- manifest


_NAME_OK = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+=@-]*$")


def _derive_names(sources: list[str]) -> list[str]:
    """The last path component (``org--name`` for hf:// ids); where two collide, the path below their common
    parent joined with ``--``."""
    def parts(s: str) -> list[str]:
        if s.startswith("hf://"):
            return [s[5:].replace("/", "--").replace("@", "@")]
        return [p for p in Path(s).parts if p not in ("/", ".")]

    names = [(parts(s) or ["adapter"])[-1] for s in sources]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        idx = [i for i, n in enumerate(names) if n in dup]
        common = os.path.commonpath([os.path.abspath(sources[i]) for i in idx]) if all(
            not sources[i].startswith("hf://") for i in idx) else ""
        for i in idx:
            rel = os.path.relpath(os.path.abspath(sources[i]), common) if common else sources[i]
            names[i] = "--".join(p for p in Path(rel).parts if p not in ("/", ".")) or names[i]  # same source
    return names


def _row_item(row: dict, where: str, base: Path, to: str | None, from_: str | None) -> dict:
    if not isinstance(row, dict):
        raise LoraMigrateError(f"{where}: expected an object with source, to, ...")
    unknown = set(row) - COLUMNS
    if unknown:
        raise LoraMigrateError(f"{where}: unknown column(s) {', '.join(sorted(unknown))} (known: "
                               f"{', '.join(sorted(COLUMNS))})")
    src = row.get("source")
    if not src or not isinstance(src, str):
        raise LoraMigrateError(f"{where}: no source")
    if not src.startswith("hf://") and not os.path.isabs(src):
        src = str(base / src)
    opts = row.get("options") or {}
    if isinstance(opts, str):
        try:
            opts = json.loads(opts)
        except ValueError:
            raise LoraMigrateError(f"{where}: options is not a JSON object: {opts!r}") from None
    if not isinstance(opts, dict):
        raise LoraMigrateError(f"{where}: options must be an object")
    for k, v in opts.items():
        if k not in OPTIONS:
            raise LoraMigrateError(f"{where}: unknown option {k!r} (known: {', '.join(OPTIONS)})")
        if not isinstance(v, OPTIONS[k]):
            raise LoraMigrateError(f"{where}: option {k!r} has the wrong type ({type(v).__name__})")
    for k in PATH_OPTIONS:
        v = opts.get(k)
        if v and not v.startswith("hf://") and not os.path.isabs(v):
            opts = {**opts, k: str(base / v)}
    target = row.get("to") or to
    if not target:
        raise LoraMigrateError(f"{where}: no 'to' (and no --to)")
    return {"source": src, "to": target, "from": row.get("from") or from_, "name": row.get("name") or None,
            "options": opts}


def read_manifest(manifest: str | Path, *, to: str | None = None, from_: str | None = None) -> list[BatchItem]:
    """The items of a JSON-lines or CSV manifest, or of a glob of folders. Errors name the line."""
    from .schemas import get_convention

    m = str(manifest)
    rows: list[dict] = []
    p = Path(m)
    if p.is_file():
        base = p.parent
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise LoraMigrateError(f"{p}: cannot read: {e}") from None
        if p.suffix.lower() == ".csv":
            reader = csv.DictReader(text.splitlines())
            for n, row in enumerate(reader, 2):
                row = {k: v for k, v in row.items() if k is not None and v not in (None, "")}
                rows.append(_row_item(row, f"{p}:{n}", base, to, from_))
        else:
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise LoraMigrateError(f"{p}:{n}: not valid JSON: {e}") from None
                rows.append(_row_item(obj, f"{p}:{n}", base, to, from_))
    elif any(c in m for c in "*?["):
        found = sorted(d for d in glob.glob(m) if os.path.isdir(d))
        if not found:
            raise LoraMigrateError(f"{m}: the glob matches no folder")
        rows = [_row_item({"source": d}, d, Path.cwd(), to, from_) for d in found]
    else:
        raise LoraMigrateError(f"{m}: no such manifest file (JSON lines, CSV, or a glob of folders)")
    if not rows:
        raise LoraMigrateError(f"{m}: the manifest lists no item")
    derived = _derive_names([r["source"] for r in rows])
    items, seen = [], {}
    for r, d in zip(rows, derived):
        name = r["name"] or d
        if not _NAME_OK.match(name) or name in (".", ".."):
            raise LoraMigrateError(f"item {r['source']}: name {name!r} cannot be a folder name; set \"name\"")
        if name in seen:
            raise LoraMigrateError(f"items {seen[name]} and {r['source']} both go to {name!r}; set \"name\"")
        seen[name] = r["source"]
        for conv in (r["to"], r["from"]):
            if conv:
                get_convention(conv)  # an unknown name fails now, not once per item
        items.append(BatchItem(source=r["source"], to=r["to"], **{"from": r["from"]}, name=name,
                               options=r["options"]))
    return items


# -------------------------------------------------------------------------------------------------- items


def _hash_source(src: Path) -> str:
    h = hashlib.sha256()
    files = [src] if src.is_file() else sorted(f for f in src.rglob("*") if f.is_file())
    for f in files:
        h.update(f.relative_to(src if src.is_dir() else src.parent).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def item_key(item: BatchItem, local_source: Path) -> str:
    from . import __version__

    head = json.dumps({"to": item.to, "from": item.from_, "options": item.options, "version": __version__},
                      sort_keys=True)
    init = item.options.get("initial_adapter")
    if init and Path(init).exists():  # small: its bytes count like the source's
        head += _hash_source(Path(init))
    base = item.options.get("base_model")
    if base and Path(base).exists():  # a whole model: its files' sizes and times, not its bytes
        files = [Path(base)] if Path(base).is_file() else sorted(f for f in Path(base).rglob("*") if f.is_file())
        head += json.dumps([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files])
    return hashlib.sha256((head + _hash_source(local_source)).encode()).hexdigest()[:32]


def run_item(item: dict, out_dir: str, prev_key: str | None) -> dict:
    """Convert one item (a :class:`BatchItem` as a dict) into ``out_dir/<name>``; never raises: a failure is a
    record with status ``failed``. ``prev_key`` is the key of an earlier ``ok`` record of the same name."""
    t0 = time.perf_counter()
    it = BatchItem.model_validate(item)
    out = Path(out_dir) / it.name
    try:
        from .codecs import codec_for
        from .schemas import get_convention

        out = codec_for(get_convention(it.to)).output_path(Path(out_dir), it.name)
    except LoraMigrateError:
        pass  # an unknown target: converting says so below, in the item's record
    rec = {"name": it.name, "source": it.source, "to": it.to, "status": "failed", "key": None, "output": str(out)}
    try:
        from .errors import VerificationFailed
        from .resolve import resolve_source

        try:
            local = Path(resolve_source(it.source))
            if not local.exists():
                raise LoraMigrateError(f"{it.source}: no such file or folder")
            rec["key"] = key = item_key(it, local)
            if prev_key == key and out.exists():
                rec.update(status="skipped", seconds=time.perf_counter() - t0)
                return rec
            from . import api  # torch: only when there is work to do

            o = it.options
            r = api.convert(local, out, to=it.to, from_=it.from_, adapter=o.get("adapter"),
                            verify=o.get("verify", True), overwrite=True, safetensors=o.get("safetensors", False),
                            keep_head=o.get("keep_head", False), model_type=o.get("model_type"),
                            allow_nonfinite=o.get("allow_nonfinite", False),
                            initial_adapter=o.get("initial_adapter"), base_model=o.get("base_model"),
                            num_layers=o.get("num_layers"))
        except VerificationFailed as e:
            rec.update(error=str(e), exit_code=1)
            return rec
        except LoraMigrateError as e:
            rec.update(error=str(e), exit_code=2)
            return rec
        reports = [a.verify for a in r.adapters if a.verify is not None]
        rec.update(status="ok", convention=r.source_convention, target=r.target_convention,
                   rules=[f"{a.plan.adapter}: {s.rule}" if len(r.adapters) > 1 else s.rule
                          for a in r.adapters for s in a.plan.steps],
                   modules=sum(a.plan.modules for a in r.adapters), bytes=sum(a.bytes for a in r.adapters))
        if reports:
            rec.update(max_rel_fro=max(x.max_rel_fro for x in reports),
                       max_rel_probe=max(x.max_rel_probe for x in reports),
                       tolerance=min(x.tolerance for x in reports))
    except Exception as e:  # noqa: BLE001 - a bug must fail this item only, with one line
        rec.update(status="failed", error=f"internal error ({type(e).__name__}: {e})", exit_code=2)
    finally:
        rec.setdefault("seconds", time.perf_counter() - t0)
    rec["seconds"] = time.perf_counter() - t0
    return rec


# ------------------------------------------------------------------------------------------------- runner


def read_report(path: Path) -> dict[str, ItemRecord]:
    """The last record per name of an earlier (possibly interrupted) run; unreadable lines are ignored."""
    out: dict[str, ItemRecord] = {}
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            r = ItemRecord.model_validate_json(line)
        except ValueError:
            continue  # a line cut by a kill
        if r.status in ("ok", "skipped") or r.name not in out:
            out[r.name] = r
    return out


def _lock(out: Path):
    fh = open(out / LOCK_NAME, "w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise LoraMigrateError(f"{out}: another batch is writing into it") from None
    return fh


def _clean_stale(out: Path) -> None:
    """Temporary folders of conversions that a kill interrupted (safe: we hold the folder's lock)."""
    for p in out.glob(".*.lora-migrate-tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in out.glob(".*.lora-migrate-old-*"):
        shutil.rmtree(p, ignore_errors=True)


def batch(manifest: str | Path, out: str | Path, *, jobs: int = 1, report: str | Path | None = None,
          to: str | None = None, from_: str | None = None, executor: str = "local", address: str | None = None,
          on_record: Callable[[ItemRecord, int, int], None] | None = None) -> BatchResult:
    """Convert every item of MANIFEST into ``out/<name>``; returns one record per item (also in the report).

    ``on_record(record, done, total)`` is called as each item finishes (progress display)."""
    from .executors import WorkerLost, make_executor

    t0 = time.perf_counter()
    items = read_manifest(manifest, to=to, from_=from_)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LoraMigrateError(f"cannot create {out}: {e.strerror or e}") from None
    report = Path(report) if report else out / "report.jsonl"
    lock = _lock(out)
    try:
        _clean_stale(out)
        prev = read_report(report)
        ex = make_executor(executor, jobs, address)
        args = []
        for it in items:
            p = prev.get(it.name)
            args.append((it.model_dump(by_alias=True), str(out.resolve()),
                         p.key if p is not None and p.status in ("ok", "skipped") else None))
        records: dict[int, ItemRecord] = {}
        report.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(report, "a", encoding="utf-8") as journal:
                for i, res in ex.map_unordered(run_item, args):
                    if isinstance(res, WorkerLost):
                        it = items[i]
                        res = {"name": it.name, "source": it.source, "to": it.to, "status": "failed", "key": None,
                               "output": str(out.resolve() / it.name), "error": res.reason, "exit_code": 2}
                    rec = ItemRecord.model_validate(res)
                    if rec.status == "skipped":  # keep the figures of the run that did the work
                        old = prev[rec.name]
                        rec = old.model_copy(update={"status": "skipped", "seconds": rec.seconds})
                    records[i] = rec
                    journal.write(rec.model_dump_json() + "\n")
                    journal.flush()
                    if on_record is not None:
                        on_record(rec, len(records), len(items))
        finally:
            ex.close()
        final = [records[i] for i in range(len(items))]
        tmp = report.with_name(f".{report.name}.tmp")
        tmp.write_text("".join(r.model_dump_json() + "\n" for r in final), encoding="utf-8")
        os.replace(tmp, report)
    finally:
        lock.close()
    return BatchResult(out=str(out), report=str(report), executor=ex.name, workers=ex.workers, items=final,
                       seconds=time.perf_counter() - t0)


def summary_table(result: BatchResult) -> str:
    """A plain-text table: counts by status, totals, and the failed items with their reasons."""
    rows = [("status", "items", "seconds (sum)", "MB written")]
    for st in ("ok", "skipped", "failed"):
        rs = [r for r in result.items if r.status == st]
        rows.append((st, str(len(rs)), f"{sum(r.seconds for r in rs):.1f}", f"{sum(r.bytes for r in rs) / 1e6:.2f}"))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    fro = [r.max_rel_fro for r in result.items if r.status == "ok" and r.max_rel_fro is not None]
    lines.append(f"{len(result.items)} items in {result.seconds:.1f} s ({result.executor}, {result.workers} "
                 f"worker{'s' if result.workers != 1 else ''})"
                 + (f"; max relative error {max(fro):.2g}" if fro else "") + f"; report: {result.report}")
    for r in result.items:
        if r.status == "failed":
            lines.append(f"FAILED {r.name}: {r.error}")
    return "\n".join(lines)
