"""The command line. It parses, calls the library, prints, and maps errors to exit codes in one place:
0 ok, 1 the numeric check failed, 2 bad input or usage, 3 internal error; with ``--json`` every exit prints
exactly one JSON document on stdout. The library (and torch) are imported only when a
command runs, so ``--help`` and ``conventions`` stay fast."""

from __future__ import annotations

import json
import os
import sys

import click


def _echo_modules(report, indent: str) -> None:
    for m in report.modules:
        fro = "-" if m.rel_fro is None else f"{m.rel_fro:.2g}"
        probe = "-" if m.rel_probe is None else f"{m.rel_probe:.2g}"
        click.echo(f"{indent}{m.module}: {m.status}, relative error {fro} (Frobenius) / {probe} (probes)"
                   + (f" {m.detail}" if m.detail and not m.ok else ""))


def _echo_json(model) -> None:
    if isinstance(model, list):
        click.echo(json.dumps([m.model_dump(mode="json") for m in model], indent=2))
    else:
        click.echo(model.model_dump_json(indent=2))


def _lib(name: str):
    """Import ``lora_migrate.<name>`` for a command that works on tensors, torch first, with the garbage collector
    off, then move everything imported out of its sight (``gc.freeze``) and turn it back on: torch leaves ~10⁶
    long-lived objects, and the full collections that its import, the library's imports and the conversion would
    trigger each scan them all again (together ~0.1–0.3 s of start-up on a 2-core machine). numpy's OpenBLAS is
    kept to one thread (``OPENBLAS_NUM_THREADS``, unless set): nothing here needs its pool, whose threads
    otherwise spin beside the conversion's. Only the command line does this; a program that imports the library
    keeps its own settings."""
    import gc
    import importlib

    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    enabled = gc.isenabled()
    gc.disable()
    try:
        import torch  # noqa: F401

        module = importlib.import_module(f"{__package__}.{name}")
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
    return module


def _error_json(kind: str, message: str, path: str | None = None, **extra) -> None:
    """The one JSON document of a failed command with ``--json``: ``{"error": {kind, message, path}}``."""
    click.echo(json.dumps({"error": {"kind": kind, "message": message, "path": path}, **extra}, indent=2))


class Group(click.Group):
    """Turns every failure into one line on stderr and an exit code, and with ``--json`` also into exactly one JSON
    document on stdout: 1 the numeric check failed, 2 bad input or usage, 3 an internal error. Never a
    traceback (unless LORA_MIGRATE_DEBUG is set)."""

    def invoke(self, ctx):
        from .errors import EXIT_INTERNAL, LoraMigrateError, VerificationFailed

        args = [*getattr(ctx, "_protected_args", ()), *ctx.args]
        as_json = "--json" in args[1:]
        try:
            return super().invoke(ctx)
        except VerificationFailed as e:
            if as_json:
                report = None if e.report is None else e.report.model_dump(mode="json")
                _error_json(e.kind, str(e), None, report=report)
            click.echo(f"error: {e}", err=True)
            if e.report is not None:
                for m in e.report.failures()[:10]:
                    click.echo(f"  {m.module}: {m.status} {m.detail}", err=True)
            click.echo(getattr(e, "tail", "nothing was written"), err=True)
            sys.exit(e.exit_code)
        except LoraMigrateError as e:
            if as_json:
                _error_json(e.kind, str(e), e.path)
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:  # usage: a missing argument, a bad option value, an unknown command
            if as_json:
                _error_json("usage", e.format_message())
            e.show()
            sys.exit(e.exit_code)
        except (click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as a SIGPIPE'd tool does
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(141)
        except KeyboardInterrupt:
            if as_json:
                _error_json("interrupted", "interrupted; nothing was written")
            click.echo("interrupted; nothing was written", err=True)
            sys.exit(130)
        except Exception as e:  # a bug: one line, exit 3
            if os.environ.get("LORA_MIGRATE_DEBUG"):
                raise
            message = (f"internal error ({type(e).__name__}: {e}); nothing was written; rerun with "
                       "LORA_MIGRATE_DEBUG=1 for the traceback and please report it")
            if as_json:
                _error_json("internal", message)
            click.echo(f"error: {message}", err=True)
            sys.exit(EXIT_INTERNAL)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lora-migrate")
def main():
    """Move LoRA adapters between libraries without changing what they compute.

    \b
    lora-migrate inspect SRC
    lora-migrate convert SRC OUT --to adapters-1.0
    lora-migrate conventions
    """


def _conversion_inputs(f):
    """The options that say how to read the source (shared by ``convert`` and ``push``)."""
    for opt in reversed((
        click.option("--initial-adapter", type=click.Path(path_type=str),
                     help="PiSSA/OLoRA/CorDA/LoRA-GA: the adapter saved before training; the output is rank-2r "
                          "LoRA against the original weights."),
        click.option("--base-model", type=click.Path(path_type=str),
                     help="PiSSA (full SVD) / OLoRA: the original, un-mutated base model (folder with "
                          "model.safetensors, shards or pytorch_model.bin; or hf://org/name); the initial adapter "
                          "is rebuilt from its weights. Also gives the base config.json for embedding LoRA on a "
                          "scaled embedding (Gemma3, BART scale_embedding) between PEFT eras."),
        click.option("--model-type", help="Base model type (llama, qwen2, gpt2, t5, …) when a PEFT source goes to "
                                          "AdapterHub; read from the base model's config.json or inferred from "
                                          "module paths when left out."),
        click.option("--num-layers", type=click.IntRange(min=1),
                     help="--to lorax: the base model's layer count, for an adapter on only some layers "
                          "(layers_to_transform, a regex target_modules): each layer type gets zero adapters in the "
                          "layers it lacks, since LoRAX drops a type missing from any layer."),
        click.option("--allow-nonfinite", is_flag=True,
                     help="Pass tensors holding NaN/Inf through as they are (refused by default; such modules are "
                          "not compared)."),
    )):
        f = opt(f)
    return f


@main.command()
@click.argument("src", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--to", "to", required=True, help="Target convention, e.g. adapters-1.0 or adapters@1.3.0.")
@click.option("--from", "from_", help="Source convention; detected when left out.")
@click.option("--adapter", help="Convert only this adapter (of several side by side); written straight into OUT.")
@click.option("--dry-run", is_flag=True, help="Print the plan and the output layout; write nothing.")
@click.option("--no-verify", is_flag=True, help="Skip the numeric check (not recommended).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--safetensors", is_flag=True,
              help="Write adapter.safetensors instead of pytorch_adapter.bin (load it with use_safetensors=True).")
@click.option("--keep-head", is_flag=True, help="Copy head files that only repeat the base model's head.")
@_conversion_inputs
@click.option("-v", "--verbose", is_flag=True, help="Print the check of every module.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (with every module's check).")
def convert(src, out, to, from_, adapter, dry_run, no_verify, overwrite, safetensors, keep_head, initial_adapter,
            base_model, model_type, num_layers, allow_nonfinite, verbose, as_json):
    """Rewrite the adapter(s) in SRC into another convention at OUT, then check the math.

    Several adapters in SRC (a full model with m1, m2, or a folder of adapter folders) go to OUT/<name>/ each,
    unless --adapter picks one. The output is written to a temporary folder and renamed into place only after
    the numeric check passes.

    \b
    Example:
      lora-migrate convert at31/ out/ --from adapter-transformers-3.1 --to adapters-1.0
      lora-migrate convert peft_rslora/ out/ --to lorax
      lora-migrate convert peft_layer0/ out/ --to lorax --num-layers 32
      lora-migrate convert pissa/ out/ --to peft --initial-adapter pissa_init/
      lora-migrate convert pissa/ out/ --to peft --base-model llama-original/
    """
    api = _lib("api")

    r = api.convert(src, out, to=to, from_=from_, adapter=adapter, verify=not no_verify, overwrite=overwrite,
                    dry_run=dry_run, safetensors=safetensors, keep_head=keep_head, initial_adapter=initial_adapter,
                    base_model=base_model, model_type=model_type, allow_nonfinite=allow_nonfinite,
                    num_layers=num_layers)
    if as_json:
        _echo_json(r)
        return
    click.echo(f"{r.source}: {r.layout}, {r.source_convention} → {r.target_convention}")
    for a in r.adapters:
        p = a.plan
        where = a.output if not r.dry_run else f"{a.output} (not written)"
        click.echo(f"\nadapter {p.adapter!r} → {where}")
        click.echo(f"  {p.modules} modules, r={p.r}, alpha {p.alpha_in:g} → {p.alpha_out:g}, "
                   f"{p.rescaled} rescaled")
        if r.dry_run:
            for i, s in enumerate(p.steps, 1):
                click.echo(f"  {i}. [{s.rule}] {s.what}")
            click.echo(f"  files: {', '.join(p.files)}")
        for n in a.notes:
            click.echo(f"  note: {n}")
        if a.verify is not None:
            click.echo(f"  check: {a.verify.summary()}")
            if verbose:
                _echo_modules(a.verify, "    ")
        elif not r.dry_run:
            click.echo("  check: skipped (--no-verify)")


@main.command()
@click.argument("path", type=click.Path(path_type=str))
@click.option("--from", "from_", help="Read as this convention instead of detecting it.")
@click.option("--modules", "show_modules", is_flag=True, help="List every module.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def inspect(path, from_, show_modules, as_json):
    """Name the convention and version of PATH, with the reasons, and describe its adapters."""
    api = _lib("api")

    r = api.inspect(path, from_=from_)
    if as_json:
        _echo_json(r)
        return
    click.echo(f"{r.path}: {r.layout}")
    click.echo(f"convention: {r.convention} ({r.library} {r.library_versions})")
    for why in r.reasons:
        click.echo(f"  because {why}")
    for a in r.adapters:
        click.echo(f"\nadapter {a.name!r}: r={a.r}, alpha={a.alpha:g}, {a.modules} modules "
                   f"({', '.join(f'{n} {k}' for k, n in a.layer_kinds.items())}), {', '.join(a.dtypes)}, "
                   f"{a.bytes / 1e6:.2f} MB")
        for k, s in a.scales.items():
            click.echo(f"  effective scale, {k}: {s}")
        if not a.convertible:
            click.echo(f"  not convertible: {a.why_not}")
        if a.head:
            click.echo(f"  head files: {a.head}")
        for lc in a.as_loaded:
            click.echo(f"  loaded as is by {lc.library} {lc.versions}: {lc.detail}")
        for n in a.notes:
            click.echo(f"  note: {n}")
        if show_modules:
            for m in a.module_list:
                shapes = " ".join(f"{p}{s}" for p, s in m.shapes.items())
                click.echo(f"    {m.module} [{m.kind}] r={m.r} {shapes} {m.dtype} s={m.scale:g}")


@main.command()
@click.argument("src", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--from", "from_", help="Convention of SRC (detected when left out).")
@click.option("--to", "to", help="Convention of OUT (detected when left out).")
@click.option("--initial-adapter", type=click.Path(path_type=str),
              help="SRC is PiSSA-style: compare OUT with SRC minus this initial adapter (as convert wrote it).")
@click.option("--base-model", type=click.Path(path_type=str),
              help="SRC is PiSSA (full SVD) / OLoRA: rebuild its initial adapter from this original base model.")
@click.option("-v", "--verbose", is_flag=True, help="Print the check of every module.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify(src, out, from_, to, initial_adapter, base_model, verbose, as_json):
    """Check that OUT computes the same ΔW as SRC, module by module. Exit 1 if it does not."""
    api = _lib("api")

    r = api.verify(src, out, from_=from_, to=to, initial_adapter=initial_adapter, base_model=base_model)
    if as_json:
        _echo_json(r)
    else:
        click.echo(f"{r.source} ({r.source_convention}) vs {r.output} ({r.output_convention})")
        for name, rep in r.adapters.items():
            click.echo(f"  {name}: {rep.summary()}")
            if verbose:
                _echo_modules(rep, "    ")
            else:
                for m in rep.failures()[:10]:
                    click.echo(f"    {m.module}: {m.status} {m.detail}")
    if not r.ok:
        sys.exit(1)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def conventions(as_json):
    """List every convention with its scaling rule."""
    if as_json:
        from .schemas.info import conventions as infos

        _echo_json(infos())
        return
    from ._listing import LISTING  # render_conventions() of the schemas, kept current by a test

    click.echo(LISTING, nl=False)


def render_conventions(conventions) -> str:
    """The text of ``lora-migrate conventions`` for these :class:`~lora_migrate.schemas.Convention` objects.

    The command prints a copy of it from ``lora_migrate/_listing.py`` (written by
    ``scripts/gen_conventions_listing.py``; ``tests/test_cli.py`` fails when it differs from the schemas), so that
    listing the conventions does not import pydantic and build every schema (~170 ms, half of the command's time)."""
    lines = []
    for c in conventions:
        lines.append(f"{c.name:26} {c.library} {c.versions}")
        lines.append(f"{'':26} scale: {c.scaling_notes}")
        files = " + ".join(f for f in (c.config_file, c.weights_write) if f)
        version = f" (version {c.version_to_write!r})" if c.version_to_write else ""
        lines.append(f"{'':26} writes: {files}{version}")
        if c.aliases:
            lines.append(f"{'':26} also: {', '.join(c.aliases[:6])}{' …' if len(c.aliases) > 6 else ''}")
    return "".join(line + "\n" for line in lines)


@main.command("fix-merged")
@click.argument("merged_dir", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--adapter", "adapter", required=True, type=click.Path(path_type=str),
              help="The adapter folder that was merged into MERGED_DIR.")
@click.option("--merged-with", "merged_with", required=True,
              help="The convention/library that merged it, e.g. peft-0.15, peft@0.15.2, lorax.")
@click.option("--scale-used", "scale_used", type=float,
              help="The scale the merge actually applied to B·A (when it differs from the adapter's own).")
@click.option("--adapter-from", "adapter_from", help="Convention of the adapter (detected when left out).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (with every repaired tensor).")
def fix_merged(merged_dir, out, adapter, merged_with, scale_used, adapter_from, overwrite, as_json):
    """Repair a merged model (merge_and_unload + save_pretrained) that was merged wrongly, into OUT.

    \b
    PEFT 0.14.0-0.15.2 merged lora_B.bias unscaled (b + l, not b + s*l): add (s-1)*l.
    A merge at the wrong scale: add (s_true - s_used)*B*A to each adapted weight.
    Untouched tensors are copied byte for byte; the result is read back and checked.

    \b
    Example:
      lora-migrate fix-merged merged/ fixed/ --adapter adapter/ --merged-with peft@0.15.2
      lora-migrate fix-merged merged/ fixed/ --adapter rslora/ --merged-with peft --scale-used 4
    """
    run = _lib("fixmerged").fix_merged

    r = run(merged_dir, out, adapter=adapter, merged_with=merged_with, scale_used=scale_used,
            adapter_from=adapter_from, overwrite=overwrite)
    if as_json:
        _echo_json(r)
        return
    click.echo(f"{r.merged} (merged with {r.merged_with}, adapter {r.adapter_convention}) → {r.output}")
    for n in r.notes:
        click.echo(f"  note: {n}")
    for t in r.repaired:
        click.echo(f"  {t.key}: scale {t.scale_used:g} → {t.scale_true:g}, error {t.rel_to_weight:.2g} "
                   f"(tolerance {t.tolerance:.2g})")
    click.echo(f"  check: {r.summary()}")


@main.command("merge")
@click.argument("src", type=click.Path(path_type=str))
@click.argument("base_dir", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--from", "from_", help="Convention of SRC (detected when left out).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def merge(src, base_dir, out, from_, overwrite, as_json):
    """Merge the adapter SRC into the model BASE_DIR and write the dense model to OUT (LoRA and DoRA).

    The exact way to move a DoRA adapter into a library without DoRA. Streamed, then read back and checked.
    """
    run = _lib("merge").merge_adapter

    r = run(src, base_dir, out, from_=from_, overwrite=overwrite)
    if as_json:
        _echo_json(r)
        return
    click.echo(f"{r.source} ({r.convention}) into {r.base} → {r.output}")
    click.echo(f"  check: {r.summary()}")


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--expect", help="The convention PATH must be in; a mismatch fails naming both.")
@click.option("--convert-check", "convert_to", metavar="CONVENTION",
              help="Also convert (to a temporary folder) and fail if the numeric check does.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON (a list, one per path).")
def check(paths, expect, convert_to, as_json):
    """Gate adapters before an upload or commit: exit 1 on an ambiguous or mis-declared convention, inconsistent
    ranks or shapes, NaN/Inf values, or a failed --convert-check.

    PATHS are adapter folders, files inside them (as pre-commit passes them), or hf:// ids.
    """
    gate = _lib("gate")

    folders = gate.gate_targets(paths)
    results = [gate.check(p, expect=expect, convert_to=convert_to) for p in folders]
    if as_json:
        _echo_json(results)
    else:
        for r in results:
            state = "OK" if r.ok else "FAILED"
            click.echo(f"{r.path}: {state} ({r.convention or 'convention unknown'}, {len(r.adapters)} adapter(s), "
                       f"{r.modules_checked} modules checked)")
            for f in r.findings:
                where = "".join(f" {x}" for x in (f.adapter, f.module) if x)
                click.echo(f"  {f.level} [{f.code}]{where}: {f.message}")
            if r.conversion is not None:
                click.echo(f"  conversion to {r.conversion.target}: {r.conversion.summary}")
    if not all(r.ok for r in results):
        sys.exit(1)


@main.command()
@click.argument("src", type=click.Path(path_type=str))
@click.argument("repo_id")
@click.option("--to", "to", required=True, help="Convention to upload in, e.g. adapters-1.1.")
@click.option("--from", "from_", help="Source convention; detected when left out.")
@click.option("--adapter", help="Upload only this adapter (of several side by side).")
@click.option("--revision", help="Branch to commit to (default: main).")
@click.option("--private", is_flag=True, default=None, help="Create the repository private if it does not exist.")
@click.option("--safetensors", is_flag=True, help="Upload adapter.safetensors instead of pytorch_adapter.bin.")
@click.option("--keep-head", is_flag=True, help="Upload head files that only repeat the base model's head.")
@_conversion_inputs
@click.option("-m", "--message", help="Commit message.")
@click.option("--dry-run", is_flag=True, help="Convert and check, list what would be uploaded; upload nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def push(src, repo_id, to, from_, adapter, revision, private, safetensors, keep_head, initial_adapter, base_model,
         model_type, num_layers, allow_nonfinite, message, dry_run, as_json):
    """Convert SRC, check it, and upload it to the Hub repo REPO_ID with a model-card section.

    Nothing is uploaded when the numeric check fails. The token comes from huggingface_hub (HF_TOKEN or the saved
    login) and is never printed.
    """
    hub = _lib("hub")

    r = hub.push(src, repo_id, to=to, from_=from_, adapter=adapter, revision=revision, private=private,
                 dry_run=dry_run, safetensors=safetensors, keep_head=keep_head, commit_message=message,
                 initial_adapter=initial_adapter, base_model=base_model, model_type=model_type,
                 num_layers=num_layers, allow_nonfinite=allow_nonfinite)
    if as_json:
        _echo_json(r)
        return
    click.echo(f"{r.source}: {r.source_convention} → {r.target_convention}, checked for {r.checked_for}")
    for name, summary in r.checks.items():
        click.echo(f"  check {name}: {summary}")
    verb = "would upload" if r.dry_run else "uploaded"
    click.echo(f"{verb} to {r.repo_id}{'@' + r.revision if r.revision else ''}:")
    for f in r.files:
        click.echo(f"  {f.path} ({f.bytes} bytes)")
    if r.commit_url:
        click.echo(f"commit: {r.commit_url}")


@main.command()
@click.argument("manifest", type=click.Path(path_type=str))
@click.option("--out", "out", required=True, type=click.Path(path_type=str), help="Output folder: OUT/<name>/ each.")
@click.option("-j", "--jobs", default=1, show_default=True, help="Parallel workers.")
@click.option("--report", type=click.Path(path_type=str), help="JSON-lines report [default: OUT/report.jsonl].")
@click.option("--to", "to", help="Target convention for items (and globs) that do not name one.")
@click.option("--from", "from_", help="Source convention for items that do not name one.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: a process pool; ray: tasks on a Ray cluster (pip install lora-migrate[ray]).")
@click.option("--address", help="Ray cluster address (auto, ray://head:10001); a local instance when left out.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of the table.")
def batch(manifest, out, jobs, report, to, from_, executor, address, as_json):
    """Convert every adapter of MANIFEST (JSON lines or CSV: source, to, from, name, options; or a glob of
    folders) into OUT, in parallel. A rerun skips items already done with the same inputs and options.
    Exit 1 if any item failed (the others still run)."""
    batching = _lib("batching")

    show = _progress(as_json)
    try:
        r = batching.batch(manifest, out, jobs=jobs, report=report, to=to, from_=from_, executor=executor,
                           address=address, on_record=show.update)
    finally:
        show.close()
    if as_json:
        _echo_json(r)
    else:
        click.echo(batching.summary_table(r))
    if not r.ok:
        sys.exit(1)


class _Lines:
    """Progress as plain lines on stderr (not a terminal)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def update(self, rec, done, total):
        if not self.quiet:
            extra = f": {rec.error}" if rec.error else ""
            click.echo(f"[{done}/{total}] {rec.name}: {rec.status} ({rec.seconds:.1f} s){extra}", err=True)

    def close(self):
        pass


class _Bar:
    """A rich progress bar on stderr (a terminal)."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                          console=Console(stderr=True), transient=False)
        self.task = None
        self.failed = 0

    def update(self, rec, done, total):
        if self.task is None:
            self.p.start()
            self.task = self.p.add_task("converting", total=total)
        self.failed += rec.status == "failed"
        self.p.update(self.task, completed=done,
                      description=f"converting ({self.failed} failed)" if self.failed else "converting")

    def close(self):
        if self.task is not None:
            self.p.stop()


def _progress(quiet: bool):
    return _Bar() if sys.stderr.isatty() and not quiet else _Lines(quiet)


def run(argv: list[str] | None = None) -> None:
    """The console entry point: :func:`main`, then exit without the interpreter's teardown once torch is loaded.

    Tearing down an interpreter that has imported torch (freeing its tens of thousands of module objects) takes
    ~0.5 s on a 2-core machine, a sixth of converting a 1.1 GB adapter, and does nothing for the user: by the
    time a command returns, every output is written, fsynced and renamed into place, and every file it opened is
    closed. So the exit handlers run (``atexit``: temporary folders, logging), stdout and stderr are flushed, and
    the process leaves with ``os._exit`` and the command's exit code. Without torch (``--help``, ``conventions``)
    or with another non-daemon thread still running, the normal exit is kept. ``LORA_MIGRATE_FULL_EXIT=1``
    always keeps it."""
    try:
        main.main(args=argv, prog_name="lora-migrate")
        code: int = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:  # sys.exit("message"): Python prints it and exits with 1
            raise
    import threading

    if ("torch" not in sys.modules or os.environ.get("LORA_MIGRATE_FULL_EXIT")
            or any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread())):
        sys.exit(code)
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, OSError, ValueError):
            code = code or 141
    os._exit(code)


if __name__ == "__main__":
    run()
