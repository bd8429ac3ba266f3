"""The commands that work around a conversion: ``fix-merged``, ``merge``, ``check``, ``push`` and ``batch``.
:mod:`lora_migrate.cli` adds them to its group."""

from __future__ import annotations

import sys

import click

from .cli_util import _conversion_inputs, _echo_json, _lib, _progress


@click.command("fix-merged")
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


@click.command("merge")
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


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--expect", help="The convention PATH must be in; a mismatch fails naming both.")
@click.option("--convert-check", "convert_to", metavar="CONVENTION",
              help="Also convert (to a temporary folder) and fail if the numeric check does.")
@click.option("--base-model", type=click.Path(path_type=str),
              help="The base model's folder or hf:// id: its config.json gives the q/k head counts a GGUF's or "
                   "torchtune's modules need to be read (else they are a warning, not checked).")
@click.option("--model-type", help="The base model's type, where a codec needs it and the files do not say.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON (a list, one per path).")
def check(paths, expect, convert_to, base_model, model_type, as_json):
    """Gate adapters before an upload or commit: exit 1 on an ambiguous or mis-declared convention, inconsistent
    ranks or shapes, NaN/Inf values, or a failed --convert-check.

    PATHS are adapter folders, files inside them (as pre-commit passes them), or hf:// ids.
    """
    gate = _lib("gate")

    folders = gate.gate_targets(paths)
    results = [gate.check(p, expect=expect, convert_to=convert_to, base_model=base_model, model_type=model_type)
               for p in folders]
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


@click.command()
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


@click.command()
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
