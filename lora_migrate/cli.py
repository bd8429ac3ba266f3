"""The command line. It parses, calls the library, prints, and maps errors to exit codes in one place:
0 ok, 1 the numeric check failed, 2 bad input or usage, 3 internal error; with ``--json`` every exit prints
exactly one JSON document on stdout. The library (and torch) are imported only when a
command runs, so ``--help`` and ``conventions`` stay fast."""

from __future__ import annotations

import os
import sys

import click

from . import cli_ops
from .cli_util import Group, _conversion_inputs, _echo_json, _echo_modules, _lib


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
@click.option("--outtype", help="Targets that choose the factors' dtype (GGUF: f32, f16, bf16, q8_0); the check's "
                                "tolerance follows it.")
@click.option("--drop", multiple=True, help="Layers the target's loader has no place for that you accept to leave "
                                            "out (comma-separated names as the refusal gives them); the report "
                                            "names each.")
@click.option("--component", help="SRC is an adapter of one pipeline component saved without its prefix (PEFT "
                                  "on a bare UNet): unet, transformer, text_encoder or text_encoder_2 (--to "
                                  "diffusers / kohya).")
@_conversion_inputs
@click.option("-v", "--verbose", is_flag=True, help="Print the check of every module.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (with every module's check).")
def convert(src, out, to, from_, adapter, dry_run, no_verify, overwrite, safetensors, keep_head, outtype, drop,
            component, initial_adapter, base_model, model_type, num_layers, allow_nonfinite, verbose, as_json):
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
      lora-migrate convert peft_unet/ out/ --to diffusers --component unet
    """
    api = _lib("api")

    r = api.convert(src, out, to=to, from_=from_, adapter=adapter, verify=not no_verify, overwrite=overwrite,
                    dry_run=dry_run, safetensors=safetensors, keep_head=keep_head, initial_adapter=initial_adapter,
                    base_model=base_model, model_type=model_type, allow_nonfinite=allow_nonfinite,
                    num_layers=num_layers, outtype=outtype, drop=tuple(x for d in drop for x in d.split(",") if x),
                    component=component)
    if as_json:
        _echo_json(r)
        return
    click.echo(f"{r.source}: {r.layout}, {r.source_convention} → {r.target_convention}")
    for a in r.adapters:
        p = a.plan
        where = a.output if not r.dry_run else f"{a.output} (not written)"
        click.echo(f"\nadapter {p.adapter!r} → {where}")
        a_in = "per module" if p.alpha_in is None else f"{p.alpha_in:g}"
        click.echo(f"  {p.modules} modules, r={p.r}, alpha {a_in} → {p.alpha_out:g}, {p.rescaled} rescaled")
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
        r_alpha = (f"r={'per module' if a.r is None else a.r}, "
                   f"alpha={'per module' if a.alpha is None else format(a.alpha, 'g')}")
        click.echo(f"\nadapter {a.name!r}: {r_alpha}, {a.modules} modules "
                   f"({', '.join(f'{n} {k}' for k, n in a.layer_kinds.items())}), {', '.join(a.dtypes)}, "
                   f"{a.bytes / 1e6:.2f} MB")
        if a.components:
            click.echo(f"  {a.model_type or 'model type unknown (--model-type)'}: {', '.join(a.components)}")
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
@click.option("--component", help="SRC's modules belong to this pipeline component of OUT (as convert --component).")
@click.option("-v", "--verbose", is_flag=True, help="Print the check of every module.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify(src, out, from_, to, initial_adapter, base_model, component, verbose, as_json):
    """Check that OUT computes the same ΔW as SRC, module by module. Exit 1 if it does not."""
    api = _lib("api")

    r = api.verify(src, out, from_=from_, to=to, initial_adapter=initial_adapter, base_model=base_model,
                   component=component)
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


for _cmd in (cli_ops.fix_merged, cli_ops.merge, cli_ops.check, cli_ops.push, cli_ops.batch):
    main.add_command(_cmd)


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
