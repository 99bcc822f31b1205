"""`granite-ray merge`: the weighted average of N checkpoints of one architecture, as a new artifact.

LM-Cocktail (Xiao et al. 2023), as Granite Embedding R1 merges its retrievers. Every tensor is
averaged in float32 and stored in its source dtype; the tokenizer, sentence-transformers files
and model config come from the first model, so the result loads wherever the inputs did.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from granite_ray import storage
from granite_ray.config import MergeConfig, dump_config
from granite_ray.runtime import log
from granite_ray.storage import CONFIG_FILE


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder}: no safetensors weights")
    tensors = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def _weights_only(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating-point tensors: integer buffers (BERT's saved `position_ids`) are not weights, and one
    saver writes them where another does not."""
    return {k: v for k, v in tensors.items() if v.is_floating_point()}


def merge_tensors(checkpoints: list[dict[str, torch.Tensor]], weights: list[float], names: list[str]) -> dict[str, torch.Tensor]:
    checkpoints = [_weights_only(c) for c in checkpoints]
    reference = checkpoints[0]
    for name, other in zip(names[1:], checkpoints[1:]):
        if other.keys() != reference.keys():
            diff = sorted(other.keys() ^ reference.keys())
            raise ValueError(f"{name} has different weights than {names[0]}: {', '.join(diff[:5])}")
        for key, tensor in other.items():
            if tensor.shape != reference[key].shape:
                raise ValueError(f"{name}: {key} has shape {tuple(tensor.shape)}, {names[0]} {tuple(reference[key].shape)}")
    merged = {}
    for key, tensor in reference.items():
        total = sum(w * c[key].to(torch.float32) for w, c in zip(weights, checkpoints))
        merged[key] = total.to(tensor.dtype).contiguous()
    return merged


def run_merge(config: MergeConfig) -> str:
    weights = config.model_weights()
    with tempfile.TemporaryDirectory(prefix="granite-ray-merge-") as tmp, contextlib.ExitStack() as inputs:
        folders = [inputs.enter_context(storage.local_copy(uri)) for uri in config.models]
        merged = merge_tensors([_tensors(f) for f in folders], weights, config.models)
        out = Path(tmp) / "out"
        shutil.copytree(folders[0], out, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
        save_file(merged, str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / CONFIG_FILE).write_text(dump_config(config))
        storage.publish_dir(out, config.output_uri)
    log(f"merged {len(config.models)} checkpoints (weights {', '.join(f'{w:g}' for w in weights)}) into {config.output_uri}")
    return config.output_uri
