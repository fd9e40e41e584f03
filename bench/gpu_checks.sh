#!/usr/bin/env bash
# GPU checks for one device lease (about 8 minutes on an H100-class card), rows printed as
# they finish. On this machine:  bash ../shared/gpu/make-bundle.sh   (builds .gpu-bundle/)
# On the GPU host:  source .gpu-bundle/on-gpu-host.sh && bash bench/gpu_checks.sh
# (the device tool's run: carry [".gpu-bundle"], timeout_s about 540). Each part has its own
# time limit and writes $OUT/<part>.md (or /tmp/gpu-checks/) as it goes, so a lease that ends
# early still returns the rows done; SKIP="seed preset" leaves parts out; DRY=1 prints the
# plan. Paste the files into docs/benchmarks.md with the card, torch version and date.
#   1. smoke   60 s   bench/gpu_smoke.py: nproc auto, the sync-free step loop under
#                     set_sync_debug_mode("error"), bf16 vs fp32 likelihoods, bitwise resume,
#                     the probed plan without recompiles
#   2. demo    90 s   trainer vs the best plain loop at 1x32x32 (latent 32, batch 128)
#   3. seed   150 s   the seed's config 3x250x250 (latent 128, batch 64): trainer / headroom
#   4. preset 150 s   params/binarized-benchmark.yaml's variants (validation only)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-checks}
mkdir -p "$out"
skip=" ${SKIP:-} "
export XDG_CACHE_HOME="$out/cache"  # the step probe's cache: part of what comes back
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
start=$SECONDS

part() {  # name, seconds, command...: time-limited, streamed to stdout and $out/<name>.md
  local name=$1 limit=$2; shift 2
  if [[ $skip == *" $name "* ]]; then echo "== $name: skipped"; return; fi
  echo "== $name (limit ${limit}s, at ${SECONDS}s): $*"
  [[ -n ${DRY:-} ]] && return
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$name.md"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start))s"
}

part smoke 60 "$py" bench/gpu_smoke.py
part demo 90 "$py" bench/train_throughput.py --images 16384 --rounds 3
part seed 150 "$py" bench/train_throughput.py --channels 3 --image-size 250 \
  --latent-dim 128 --batch-size 64 --images 2048 --rounds 3
part preset 150 "$py" bench/binarized_preset.py --device cuda --images 20000 --epochs 5 --k 1000
echo "== all parts done in $((SECONDS - start))s; files in $out"
