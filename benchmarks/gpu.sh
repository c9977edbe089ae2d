#!/usr/bin/env bash
# The GPU measurements of docs/results/benchmarks.md and docs/results/imaml.md, in one go.
#
#   bash benchmarks/gpu.sh OUT_DIR OMNIGLOT_DIR [PART ...]
#
# PART is any of: tests smoke memory bench4 bench32 default chunking fair omniglot (default: all but omniglot).
# OMNIGLOT_MINUTES (default 4) sets the wall-clock budget of the Omniglot run and
# OMNIGLOT_ARGS adds options to it (e.g. "--prox-schedule last_step --damping 22").
# Each part has its own time limit, so one failure does not stop the others.
set -u
out=${1:?usage: gpu.sh OUT_DIR OMNIGLOT_DIR [PART ...]}
data=${2:?usage: gpu.sh OUT_DIR OMNIGLOT_DIR [PART ...]}
shift 2
parts=${*:-tests smoke memory bench4 bench32 default chunking fair}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda)" | tee -a "$out/gpu.txt"

for part in $parts; do
  start=$(date +%s)
  case $part in
    tests)  # CUDA-graph replays equal eager results; fair training on CUDA equals CPU
      (cd "$root" && timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py \
         tests/test_fair_train.py -k "cuda or graph") > "$out/tests.log" 2>&1 ;;
    fair)  # the transductive Communities comparison of docs/results/fair.md, on the GPU
      (cd "$root" && timeout 400 bilevel fair --dataset communities --k-shot 10 --constraint-set task --mu 0.001 \
         --delta 0.005 --c 0 0.05 0.2 --device cuda --no-progress --out "$out/fair_cc_task") > "$out/fair.log" 2>&1 ;;
    bench4)  # time per meta-gradient against the peers, meta-batch 4 (sinusoid-pd: the well-posed sinusoid)
      (cd "$root/benchmarks" &&
       timeout 600 python3 hypergradient.py --device cuda --problems sinusoid-pd sinusoid conv --steps 5 80 --tasks 4 \
         --impls ours-implicit ours-implicit-graph torchopt-implicit jaxopt-implicit floor \
         --min-time 0.5 --max-time 3 --timeout 500 --out "$out/hg4.jsonl") > "$out/bench4.log" 2>&1 ;;
    bench32)  # meta-batch 32: vectorized against a loop over tasks, and torchopt
      (cd "$root/benchmarks" &&
       timeout 300 python3 hypergradient.py --device cuda --problems sinusoid conv --steps 5 --tasks 32 \
         --impls ours-implicit ours-implicit-graph ours-implicit-loop torchopt-implicit \
         --min-time 0.5 --max-time 3 --timeout 280 --converged-max-tasks 0 --out "$out/hg32.jsonl") \
        > "$out/bench32.log" 2>&1 ;;
    default)  # meta_gradient with its defaults against torchopt and the hand-written loop, operator products counted
      (cd "$root/benchmarks" &&
       timeout 400 python3 default_path.py --device cuda --problems conv sinusoid-pd sinusoid --min-time 1 \
         --out "$out/default_path.jsonl") > "$out/default_path.log" 2>&1 ;;
    chunking)  # the meta-gradient by vmap chunk size, and one convolution layer vmapped against looped
      (cd "$root" && timeout 200 python3 benchmarks/chunking.py --device cuda --repeats 10 \
         --out "$out/chunking.jsonl") > "$out/chunking.log" 2>&1 ;;
    memory)  # peak GPU memory of one meta-step against the inner steps, implicit vs unrolled
      (cd "$root" && timeout 90 python3 benchmarks/memory.py --device cuda --steps 5 25 100 --out "$out/memory") \
        > "$out/memory.log" 2>&1 ;;
    smoke)  # a few graphed Omniglot meta-steps through the command line
      timeout 120 bilevel imaml --dataset omniglot --device cuda --cuda-graph --steps 40 --log-every 20 \
        --eval-every 40 --checkpoint-every 40 --eval-tasks 32 --final-tasks 64 --data-dir "$data" \
        --cache-dir "${BILEVEL_CACHE_DIR:-/tmp/bilevel-cache}" --out-dir "$out/smoke" --no-progress > "$out/smoke.log" 2>&1 ;;
    omniglot)  # 5-way 1-shot iMAML with the paper's settings for a fixed wall-clock budget
      minutes=${OMNIGLOT_MINUTES:-4}
      timeout $(( ${minutes%.*} * 60 + 150 )) bilevel imaml --dataset omniglot --ways 5 --shots 1 --device cuda \
        --cuda-graph --max-minutes "$minutes" --log-every 50 --eval-every 500 --checkpoint-every 500 \
        --eval-tasks 200 --final-tasks 600 --data-dir "$data" --cache-dir "${BILEVEL_CACHE_DIR:-/tmp/bilevel-cache}" \
        --out-dir "$out/omniglot5" --no-progress ${OMNIGLOT_ARGS:-} > "$out/omniglot5.log" 2>&1 ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac
  echo "$part: exit $? in $(( $(date +%s) - start )) s" | tee -a "$out/parts.txt"
done
