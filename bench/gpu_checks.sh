#!/usr/bin/env bash
# GPU checks for the trainer's speed and the benchmark preset, as one script for a device lease.
# On this machine:   bash ../shared/gpu/make-bundle.sh      (builds .gpu-bundle/, git-ignored)
# On the GPU host:   source .gpu-bundle/on-gpu-host.sh && bash bench/gpu_checks.sh
# (the device tool's run: carry [".gpu-bundle"], timeout about 540 s). Results go to $OUT (or
# /tmp/gpu-checks), one Markdown file per part; paste them into docs/benchmarks.md with the
# card, torch version and date the files start with. Sized for about 8 minutes on an H100;
# each part is skipped when SKIP names it (e.g. SKIP="preset").
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-checks}
mkdir -p "$out"
skip=" ${SKIP:-} "
export XDG_CACHE_HOME="$out/cache"  # the step probe's cache: part of what comes back

run() {  # name, command...: time-limited, logged, never stops the other parts
  local name=$1; shift
  [[ $skip == *" $name "* ]] && { echo "skipped $name"; return; }
  echo "== $name: $*"
  timeout 300 "$@" 2>&1 | tee "$out/$name.md"
}

# 1. Demo config 1x32x32 (latent 32, batch 128): trainer vs plain loop vs the headroom rows.
run demo python3 bench/train_throughput.py --device cuda --images 16384 --rounds 5
# 2. The seed's config 3x250x250 (latent 128, batch 64).
run seed python3 bench/train_throughput.py --device cuda --channels 3 --image-size 250 \
  --latent-dim 128 --batch-size 64 --images 2048 --rounds 5
# 3. The binarized preset's variants on the bundle's 20k Fashion-MNIST images (validation only).
run preset python3 bench/binarized_preset.py --device cuda --images 20000 --epochs 10 --k 1000
cp -r "$XDG_CACHE_HOME" "$out/" 2>/dev/null || true
