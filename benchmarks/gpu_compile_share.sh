#!/usr/bin/env bash
# On the lent GPU machine, after the kit is installed (../shared/gpu/README.md): compiled
# code shared by architecture (bench_compile_share.py). A is mkmodel's 1.1B Llama; A' has
# A's config and tokenizer (links) and other weights (A's plus seeded noise); C is another
# config (the project's 1b build: other vocabulary). One fresh VLLM_CACHE_ROOT: plain A,
# then a parking pool attaches A, A', C; then plain A' for A's reference tokens.
#   usage: bash benchmarks/gpu_compile_share.sh [--no-parking]
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
A=/root/models/l1b; FT=/root/models/l1b-ft; C=/root/models/l1b-b
[ -d $A ] || python3 /root/kit/mkmodel.py $A 1b | tee -a "$OUT/mkmodel.txt"
[ -d $C ] || python3 -m vllm_pool.testing.tiny_model $C --size 1b --seed 1 --dtype bfloat16
if [ ! -f $FT/model.safetensors ]; then
  mkdir -p $FT
  for f in $A/*; do case $f in *.safetensors) ;; *) ln -sf $f $FT/ ;; esac; done
  python3 - $A $FT <<'PY'
import glob, os, sys, torch
from safetensors.torch import load_file, save_file
src, dst = sys.argv[1:]
g = torch.Generator(device="cuda").manual_seed(1)
for path in sorted(glob.glob(os.path.join(src, "*.safetensors"))):
    t = load_file(path, device="cuda")
    for k, v in t.items():  # other weights, same shapes and dtype: a "fine-tune"
        t[k] = (v.float() + 0.5 * v.float().std() * torch.randn(v.shape, generator=g, device="cuda")).to(v.dtype)
    save_file(t, os.path.join(dst, os.path.basename(path)), metadata={"format": "pt"})
print("A' written", dst)
PY
fi
cmp -s $A/config.json $FT/config.json && echo "A' config == A config" | tee "$OUT/ft-config.txt"
timeout -s TERM "${SHARE_TIMEOUT:-540}" python3 benchmarks/bench_compile_share.py --device gpu \
  --gpus "${GPUS:-0}" --model $A --model-ft $FT --model-c $C \
  --engine-args "--dtype bfloat16 --max-model-len 2048 --gpu-memory-utilization 0.45" \
  --log-dir /tmp/share-logs --output-json "$OUT/compile-share.json" "$@" 2>&1 | tee "$OUT/compile-share.txt"
rc=${PIPESTATUS[0]}
tar -C /tmp -czf "$OUT/compile-share-logs.tgz" share-logs 2>/dev/null
kill_leftovers
exit $rc
