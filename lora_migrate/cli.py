"""The command line. It parses, calls the library, prints, and maps errors to exit codes in one place:
0 ok, 1 the numeric check failed, 2 bad input or usage. The library (and torch) are imported only when a
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


class Group(click.Group):
    """Turns library errors into one line on stderr and an exit code; never a traceback for bad input."""

    def invoke(self, ctx):
        from .errors import LoraMigrateError, VerificationFailed

        try:
            return super().invoke(ctx)
        except VerificationFailed as e:
            click.echo(f"error: {e}", err=True)
            if e.report is not None:
                for m in e.report.failures()[:10]:
                    click.echo(f"  {m.module}: {m.status} {m.detail}", err=True)
            click.echo("nothing was written", err=True)
            sys.exit(1)
        except LoraMigrateError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as a SIGPIPE'd tool does
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(141)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was written", err=True)
            sys.exit(130)
        except Exception as e:  # a bug, but the user still gets one line
            if os.environ.get("LORA_MIGRATE_DEBUG"):
                raise
            click.echo(f"error: internal error ({type(e).__name__}: {e}); rerun with LORA_MIGRATE_DEBUG=1 for "
                       "details and please report it", err=True)
            sys.exit(2)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lora-migrate")
def main():
    """Move LoRA adapters between libraries without changing what they compute.

    \b
    lora-migrate inspect SRC
    lora-migrate convert SRC OUT --to adapters-1.0
    lora-migrate conventions
    """


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
@click.option("--initial-adapter", type=click.Path(path_type=str),
              help="PiSSA/OLoRA/CorDA/LoRA-GA: the adapter saved before training; the output is rank-2r LoRA "
                   "against the original weights.")
@click.option("--model-type", help="Base model type (llama, qwen2, gpt2, t5, …) when a PEFT source goes to "
                                   "AdapterHub; inferred from module paths when left out.")
@click.option("--allow-nonfinite", is_flag=True,
              help="Pass tensors holding NaN/Inf through as they are (refused by default; such modules are not "
                   "compared).")
@click.option("-v", "--verbose", is_flag=True, help="Print the check of every module.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (with every module's check).")
def convert(src, out, to, from_, adapter, dry_run, no_verify, overwrite, safetensors, keep_head, initial_adapter,
            model_type, allow_nonfinite, verbose, as_json):
    """Rewrite the adapter(s) in SRC into another convention at OUT, then check the math.

    Several adapters in SRC (a full model with m1, m2, or a folder of adapter folders) go to OUT/<name>/ each,
    unless --adapter picks one. The output is written to a temporary folder and renamed into place only after
    the numeric check passes.

    \b
    Example:
      lora-migrate convert at31/ out/ --from adapter-transformers-3.1 --to adapters-1.0
      lora-migrate convert peft_rslora/ out/ --to lorax
      lora-migrate convert pissa/ out/ --to peft --initial-adapter pissa_init/
    """
    from . import api

    r = api.convert(src, out, to=to, from_=from_, adapter=adapter, verify=not no_verify, overwrite=overwrite,
                    dry_run=dry_run, safetensors=safetensors, keep_head=keep_head,
                    initial_adapter=initial_adapter, model_type=model_type, allow_nonfinite=allow_nonfinite)
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
    from . import api

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
@click.option("-v", "--verbose", is_flag=True, help="Print the check of every module.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify(src, out, from_, to, verbose, as_json):
    """Check that OUT computes the same ΔW as SRC, module by module. Exit 1 if it does not."""
    from . import api

    r = api.verify(src, out, from_=from_, to=to)
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
    from .schemas import CONVENTIONS

    if as_json:
        from . import api

        _echo_json(api.conventions())
        return
    for c in CONVENTIONS:
        click.echo(f"{c.name:26} {c.library} {c.versions}")
        click.echo(f"{'':26} scale: {c.scaling_notes}")
        click.echo(f"{'':26} writes: {c.config_file} + {c.weights_write} (version {c.version_to_write!r})")
        if c.aliases:
            click.echo(f"{'':26} also: {', '.join(c.aliases[:6])}{' …' if len(c.aliases) > 6 else ''}")


if __name__ == "__main__":
    main()
