"""What every command of the command line shares: printing, importing the library lazily, the options that say
how to read a source, progress output, and the group that maps every failure to one line and an exit code."""

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
