# One GPU lease, in phases (each call of the device tool runs one, at most 10 minutes):
#   bash benchmarks/device/phase.sh A      install transformers, keep the model's first half in /tmp/gpu
#   bash benchmarks/device/phase.sh B      dense eval, fitness throughput, the LLM searches (issues 4, 6)
#   bash benchmarks/device/phase.sh C      KL kernel, export latency, bit-width and width searches (5, 6, 7)
#   bash benchmarks/device/phase.sh E      B and C's remainder at smaller settings
#   bash benchmarks/device/phase.sh D      healing of B's results, workers on one GPU (9, 11)
#   bash benchmarks/device/phase.sh F      the GPU tests, fitness throughput with CUDA graphs and compile (6)
#   bash benchmarks/device/phase.sh G      workers 1/2/4 on the GPU, every export's latency (9, 7)
#   bash benchmarks/device/phase.sh H      every export again, 9 repetitions each (7)
#   bash benchmarks/device/phase.sh S      50% and 60% sparsity searches with the default fast path (4, 6)
#   bash benchmarks/device/phase.sh K      the GPU tests, fitness throughput (6)
#   bash benchmarks/device/phase.sh T      fitness throughput with blocks compiled by max-autotune (6)
#   bash benchmarks/device/phase.sh P      the per-candidate ratio to the simple loop, three paired rounds (6)
# Tables and logs go to $OUT; benchmarks that append to benchmarks/RESULTS.md do so in this
# copy, which comes back as $OUT/RESULTS.md. B's searches stay in /tmp/runs for D.
phase=$1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ "$phase" = A ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl2/*.whl
  mkdir -p /tmp/gpu && cp .gpu/part00 /tmp/gpu/
  PYTHONPATH=/tmp/site python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  exit 0
fi
source benchmarks/device/setup.sh
log=$OUT/all-$phase.log
step() {  # step NAME SECONDS COMMAND...: run with a time limit, record the exit status and wall time
  local name=$1 limit=$2; shift 2
  local start; start=$(date +%s)
  echo "=== $name: $*" >> "$log"
  timeout "$limit" "$@" >> "$log" 2>&1
  echo "$name rc=$? $(( $(date +%s) - start ))s" | tee -a "$OUT/phases.txt"
}
summarise() {  # the runs' result.json, condensed, even when a benchmark ran out of time
  python3 - "$@" <<'PY' >> "$OUT/runs.md"
import json, sys
from pathlib import Path
for path in sorted(Path("/tmp/runs").glob("*/result.json")):
    r = json.loads(path.read_text())
    base = {k: (round(v["perplexity"], 3), round(v["kl"], 5)) for k, v in r["baselines"].items()}
    print(f"{path.parent.name}: ppl dense {r['perplexity']['dense']:.3f} searched {r['perplexity']['compressed']:.3f} "
          f"kl {r['fitness']['kl']:.5f}; baselines {base}; budget {r['budget']['measured']}; "
          f"search {r['search']['evaluations']} evals {r['search']['seconds']} s; timings {r['timings']}")
PY
}
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/phases.txt"
case $phase in
B)
  step eval 90 python3 -m evosearch eval --tokens 65536 --device cuda --json
  step fitness 170 python3 benchmarks/fitness_gpu.py --device cuda --no-compile --out "$OUT/fitness.md"
  step search 330 python3 benchmarks/search_llm.py --device cuda --generations 100 --runs /tmp/runs --out "$OUT/search.md"
  summarise
  ;;
C)
  step kernel-tests 60 python3 -m pytest -q -x tests/test_kernels.py
  step kl 40 python3 benchmarks/kl_kernel.py --sweep --out "$OUT/kl.md"
  step export-inputs 40 python3 benchmarks/export_latency.py --write-inputs /tmp/bench-inputs
  step export 160 python3 benchmarks/export_latency.py --model /tmp/bench-inputs/model \
    --tokens /tmp/bench-inputs/tokens.npy --device cuda --work /tmp/exports --out "$OUT/export.md"
  step quant 150 python3 benchmarks/quant.py --device cuda --generations 50 --out /tmp/bench-quant
  step width 110 python3 benchmarks/width.py --device cuda --generations 50 --work /tmp/bench-width
  cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
  ;;
E)  # what B and C left out: the remaining LLM searches (fewer generations) and the exports' latencies
  step search 330 python3 benchmarks/search_llm.py --device cuda --generations 40 --targets 0.7,0.6 --runs /tmp/runs \
    --out "$OUT/search.md"
  summarise
  step export-inputs 40 python3 benchmarks/export_latency.py --write-inputs /tmp/bench-inputs
  step export 190 python3 benchmarks/export_latency.py --model /tmp/bench-inputs/model \
    --tokens /tmp/bench-inputs/tokens.npy --device cuda --work /tmp/exports --repeats 3 --new-tokens 32 \
    --generations 4 --out "$OUT/export.md"
  ;;
F)
  step gpu-tests 200 python3 -m pytest -q -rA -p no:cacheprovider tests/test_fitness.py tests/test_kernels.py
  step fitness 300 python3 benchmarks/fitness_gpu.py --device cuda --out "$OUT/fitness.md" --json "$OUT/fitness.json"
  ;;
K)
  step gpu-tests 200 python3 -m pytest -q -rA -p no:cacheprovider tests/test_fitness.py tests/test_kernels.py
  step fitness 330 python3 benchmarks/fitness_gpu.py --device cuda --no-gptq --out "$OUT/fitness.md" \
    --json "$OUT/fitness.json"
  ;;
P)
  step fitness-paired 200 python3 benchmarks/fitness_gpu.py --device cuda --no-gptq --paired 3 --out "$OUT/paired.md"
  ;;
T)
  step fitness-autotune 560 python3 benchmarks/fitness_gpu.py --device cuda --autotune --out "$OUT/autotune.md"
  ;;
S)  # the searches of B with CUDA graphs and compiled blocks (the defaults now): search time and quality
  step search 330 python3 benchmarks/search_llm.py --device cuda --generations 100 --targets 0.5,0.6 --drop 0 \
    --runs /tmp/runs --out "$OUT/search.md"
  summarise
  ;;
H)  # the exports again, more repetitions
  step export-inputs 40 python3 benchmarks/export_latency.py --write-inputs /tmp/bench-inputs
  step export 200 python3 benchmarks/export_latency.py --model /tmp/bench-inputs/model \
    --tokens /tmp/bench-inputs/tokens.npy --device cuda --work /tmp/exports --repeats 9 --new-tokens 32 \
    --generations 4 --out "$OUT/export.md"
  ;;
G)
  step workers 300 python3 benchmarks/workers.py --workers 1,2,4 --generations 10
  cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
  step export-inputs 40 python3 benchmarks/export_latency.py --write-inputs /tmp/bench-inputs
  step export 200 python3 benchmarks/export_latency.py --model /tmp/bench-inputs/model \
    --tokens /tmp/bench-inputs/tokens.npy --device cuda --work /tmp/exports --repeats 3 --new-tokens 32 \
    --generations 4 --out "$OUT/export.md"
  ;;
D)
  step heal 240 python3 benchmarks/heal.py --device cuda --runs /tmp/runs --out "$OUT/heal.md"
  step workers 200 python3 benchmarks/workers.py --workers 1,2 --generations 10
  cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
  ;;
esac
