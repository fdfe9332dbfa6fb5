#!/usr/bin/env bash
# The paper's serving benchmark on a GPU: 436M-shape dense (Llama) vs its upcycled 1.6B Mixtral at top-1 and
# top-2, vLLM with continuous batching, 3500 input / 300 output tokens, Poisson rate sweep, 3 repeats each.
# Budget: under 8 minutes of GPU time on one H100/H200 (3 models x (engine start ~40 s + 3 rates x 3 repeats
# x <= 10 s)). Prints the max-throughput table; writes runs/vllm_paper/{inference.json,max_throughput.md,...}.
#
# vLLM pins its own torch (not llm-foundry 0.22's 2.7.0), so it runs from an environment of its own:
#   VLLM_VENV   where to make it (default .venv-vllm); reused when it already has vllm
#   VLLM_WHEELS a directory of wheels (vllm and its dependencies, e.g. `pip download "vllm>=0.10,<1.0" -d wheels`
#               on a connected machine) for machines without registry access; else pip installs from the registry.
# The benchmark code needs only torch, transformers, safetensors, numpy, tqdm, matplotlib (no llm-foundry).
#
# Usage: bash benchmarks/vllm_paper_workload.sh [extra bench-inference flags]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
OUT=${OUT:-runs/vllm_paper}

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import vllm' 2>/dev/null; then
  python3 -m venv "$VENV"
  if [ -n "${VLLM_WHEELS:-}" ]; then
    "$VENV/bin/pip" install -q --no-index --find-links "$VLLM_WHEELS" "vllm>=0.10,<1.0" matplotlib
  else
    "$VENV/bin/pip" install -q "vllm>=0.10,<1.0" matplotlib
  fi
  "$VENV/bin/pip" install -q --no-deps -e .   # this package, on vLLM's torch / transformers
fi
"$VENV/bin/python" -c 'import torch, vllm; assert torch.cuda.is_available(), "no GPU"; print("vllm", vllm.__version__, "torch", torch.__version__, torch.cuda.get_device_name())'

# 436M shape (d 1024, 22 layers, FFN 2560, 16 / 4 heads, vocab 100352) and its 8-expert upcycle, random weights:
# throughput depends on the shapes, not the weights. Rates around and past saturation (a 436M model serves
# ~15 req/s of 3800 tokens on an H100 in the paper); 6 s of arrivals, 4 s drain, 3 repeats.
time "$VENV/bin/python" -m foundry_upcycle.cli bench-inference \
  --shape 436m --engine vllm --device cuda --dtype bfloat16 --workload paper --top-k 1,2 \
  --rates 8,16,32 --num-requests 256 --max-batch-size 256 --online-max-seconds 6 --drain-seconds 4 \
  --repeats 3 --batch-sizes '' --no-progress --out "$OUT" "$@"
