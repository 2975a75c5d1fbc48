#!/usr/bin/env bash
# Issue 7's GPU rows in one call on a lent GPU: first the LSTM at the tile sizes TILES, then the
# whole speed benchmark (LSTM, a random-weight RegNet-t, the per-patch loop, 0.25x-2x scaling) at the fastest tile
# whose peak CUDA memory (reserved) stays under 12 GB.  Each phase has a time limit (the first 40 %);
# speed.py writes its report after every configuration, so a phase cut short keeps what it measured.
#
#   [TILES=128,192,256] [SPEED_ARGS=...] benchmarks/speed_gpu.sh OUT [LIMIT_S]   (LIMIT_S default 540)
#
# SPEED_ARGS go to the second phase (e.g. --skip-regnet-t when that row was measured already).
set -uo pipefail
out=${1:?usage: benchmarks/speed_gpu.sh OUT [LIMIT_S]}
limit=${2:-540}
start=$SECONDS
timeout $((limit * 2 / 5)) python3 -m benchmarks.speed --device cuda --models regmis_lstm_631 \
  --tile-size "${TILES:-128,192,256}" --scales none --skip-comparisons --no-tile-profile --name speed-gpu-tiles --out "$out"
best=$(python3 - "$out/speed-gpu-tiles.json" <<'PY'
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["rows"] if "error" not in r]
fits = [r for r in rows if r["cuda_peak_reserved_bytes"] < 12e9] or rows
print(min(fits, key=lambda r: r["total_s"])["tile_size"])
PY
) || best=128
echo "[speed_gpu] fastest tile within 12 GB: $best"
timeout $((limit - (SECONDS - start))) python3 -m benchmarks.speed --device cuda \
  --models regmis_lstm_631 --tile-size "$best" ${SPEED_ARGS:-} --name speed-gpu --out "$out"
