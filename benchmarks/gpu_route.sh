#!/usr/bin/env bash
# On the lent GPU machine, after the kit is installed (../shared/gpu/README.md): what the
# `vllm` route costs (bench_route.py) against a running one-GPU pool. The kit puts /tmp/site
# on PYTHONPATH, where Python reads no .pth file, so first the plugin path is timed as the kit
# has it; then /tmp/site is made a site directory (a .pth in site-packages, removed at the
# end), which is what an ordinary `pip install` gives, and the route is timed.
#   usage: bash benchmarks/gpu_route.sh   -> $OUT/route-plugin.txt, $OUT/route.json, route.txt
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
P=18100; L=/tmp/route-logs; mkdir -p $L
python3 -m vllm_pool serve --gpus "${GPUS:-0}" --port $P --log-dir $L > $L/daemon.out 2>&1 &
D=$!
until curl -sf localhost:$P/health >/dev/null; do kill -0 $D 2>/dev/null || exit 1; sleep 0.5; done
t0=$EPOCHREALTIME
python3 -m vllm.entrypoints.cli.main pool ls --pool http://127.0.0.1:$P > $OUT/route-plugin.txt 2>&1
rc=$?
echo "plugin path (PYTHONPATH only): $(python3 -c "print(round($EPOCHREALTIME - $t0, 2))")s rc=$rc" | tee -a $OUT/route-plugin.txt
SITE=$(python3 -c 'import site; print(site.getsitepackages()[0])')
mkdir -p "$SITE" && echo "import site; site.addsitedir('/tmp/site')" > "$SITE/zz-kit-site.pth"
python3 benchmarks/bench_route.py --pool http://127.0.0.1:$P --output-json $OUT/route.json > $OUT/route.txt 2>&1
echo "bench_route rc=$?"; tail -n 40 $OUT/route.txt
rm -f "$SITE/zz-kit-site.pth"
kill -TERM $D; wait $D; echo "daemon exit $?"
tar -C /tmp -czf $OUT/route-logs.tgz route-logs
