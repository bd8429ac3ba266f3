"""Helpers shared by the runtime families' workers (gguf, mlx, torchtune). Imported by path from a worker running
inside an env's venv; needs numpy, torch and safetensors there (every env has them), transformers only for the
functions that build HF models."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path


def load_cases(worker_file):
    """The cases.py next to a worker, imported by path."""
    here = Path(worker_file).resolve().parent
    spec = importlib.util.spec_from_file_location(f"{here.name}_cases", here / "cases.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def versions(names):
    from importlib.metadata import version
    return {k: version(k) for k in names}


def maxdiff(a, b):
    import numpy as np
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def close(diff, ref, rel_tol):
    """diff within rel_tol of the reference's largest magnitude (float32 rounding grows with the values)."""
    import numpy as np
    return diff <= rel_tol * float(np.max(np.abs(ref)))


def max_abs(x):
    import numpy as np
    return fmt(float(np.max(np.abs(x))))


def fmt(x):
    return float(f"{x:.3g}")


def write_json(path, obj):
    Path(path).write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def hf_model(arch_entry, seed, base_dir=None):
    """transformers.<model_class> in float32, eager attention: from arch_entry['config'] with torch seed `seed`, or
    from base_dir's config.json + model.safetensors (rotary buffers rebuilt; lm_head tied if the config says so)."""
    import torch
    import transformers
    cfg_cls = getattr(transformers, arch_entry["config_class"])
    if base_dir is None:
        torch.manual_seed(seed)
        cfg = cfg_cls(**arch_entry["config"])
    else:
        cfg = cfg_cls(**json.loads((Path(base_dir) / "config.json").read_text()))
    cfg._attn_implementation = "eager"
    model = getattr(transformers, arch_entry["model_class"])(cfg).float().eval()
    if base_dir is not None:
        from safetensors.torch import load_file
        _, unexpected = model.load_state_dict(load_file(str(Path(base_dir) / "model.safetensors")), strict=False)
        assert not unexpected, unexpected
    return model


def save_hf_base(model, arch, arch_entry, dest):
    """model.safetensors (no rotary buffers) + a config.json holding exactly the case data's config."""
    from safetensors.numpy import save_file
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().numpy() for k, v in model.state_dict().items() if "rotary" not in k}
    save_file(sd, str(dest / "model.safetensors"), metadata={"format": "pt"})
    write_json(dest / "config.json", dict(arch_entry["config"], architectures=[arch_entry["model_class"]],
                                          model_type=arch, torch_dtype="float32"))


def hf_logits(model, input_ids):
    import torch
    with torch.no_grad():
        return model(input_ids=torch.tensor([input_ids])).logits[0].float().numpy()


def run_main(tasks):
    """worker.py TASK JOB.json RESULT.json -> RESULT = tasks[TASK](job)."""
    if len(sys.argv) != 4 or sys.argv[1] not in tasks:
        print(f"usage: worker.py {'|'.join(tasks)} JOB.json RESULT.json", file=sys.stderr)
        raise SystemExit(2)
    job = json.loads(Path(sys.argv[2]).read_text())
    write_json(sys.argv[3], tasks[sys.argv[1]](job))
