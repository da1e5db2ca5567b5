#!/usr/bin/env bash
# The MFU table on one H100, in ONE device call of about 7-8 minutes including compiles:
#   1. the cuDNN attention tests (tests/test_attention.py -k cudnn: output and gradients against the
#      float64 reference, causality; conftest.py defaults JAX to CPU, hence JAX_PLATFORMS=cuda), < 100 s;
#   2. benchmarks/mfu.py: neox_125m at 2048 and gpt2_small at 1024 at the largest batch measured to fit
#      without microbatches, the 1.5B shape on one device in 4 microbatches, AdamW and Sophia-G each, and
#      one naive-attention row (the 8 x 2048 full-remat setting that reached 8.5% MFU before).
#
# Batches come from XLA's compiled memory analysis on CPU with blockwise attention (cuDNN's fused kernel
# keeps the same O(seq) residuals): arguments + temporaries of the largest program, GiB:
#   neox_125m 32 x 2048, remat none, loss_chunk 512 (the config's): train 1.8 + 50.4; the Sophia-G
#     Hessian step on its 32-sequence batch (hessian_batch_fraction 1.0, unchunked logits) 1.8 + 81.3,
#     so it runs in 4 Hessian microbatches here (1.8 + 31.1);
#   gpt2_small 64 x 1024, remat none: train 1.8 + 68.2 whole loss, 1.8 + 50.4 with loss_chunk 256;
#     Hessian step 1.8 + 81.2, 1.8 + 31.0 in 4 Hessian microbatches;
#   neox_1_5b 32 x 2048 in 4 microbatches of 8, remat full, loss_chunk 512: train 16.9 + 28.3, Hessian
#     step (8 sequences) 16.9 + 23.9;
#   the naive row, neox_125m 8 x 2048, remat full, whole loss: train 1.8 + 9.3.
# A row that still runs out of memory is retried at half its batch (costs one more compile).
#
# Run from the repository root with .dev/ prepared as in shared/gpu/README.md (haliax, aqtp and jmp wheels
# in .dev/whl, .dev/sitecustomize.py) and carried:
#   run(command="bash benchmarks/gpu_mfu.sh", carry=[".dev"], timeout_s=600)
# Writes $OUT/attention_tests.log, $OUT/mfu.md (the table, rewritten after every row) and $OUT/mfu.log.
set -euo pipefail
: "${OUT:?set OUT to the folder whose files come back}"
if [ ! -d .dev/whl ] || [ ! -f .dev/sitecustomize.py ]; then
    echo "gpu_mfu.sh: .dev/whl/*.whl and .dev/sitecustomize.py are missing; prepare them as shared/gpu/README.md says" >&2
    exit 2
fi
python3 -m pip install -q --no-index --no-deps --target /tmp/site .dev/whl/*.whl
cp .dev/sitecustomize.py /tmp/site/
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92  # JAX's default 0.75 would leave ~19 GiB of the 80 unused
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/mfu.log"

JAX_PLATFORMS=cuda timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py -k cudnn \
    > "$OUT/attention_tests.log" 2>&1 || echo "cudnn attention tests failed or timed out (rc $?): see attention_tests.log" | tee -a "$OUT/mfu.log"
tail -n 3 "$OUT/attention_tests.log" | tee -a "$OUT/mfu.log"

# Rows in order of importance (the 1.5B ones, the slowest to compile, last): mfu.md holds every finished row.
python3 benchmarks/mfu.py --steps 10 --row-timeout 200 --optimizers adamw sophia_g \
    --configs neox_125m:32,optimizer.hessian_microbatches=4 \
              gpt2_small:64,model.loss_chunk=256,optimizer.hessian_microbatches=4 \
              neox_1_5b:32/4,mesh.model=1 \
    --naive neox_125m:8,model.remat=full,model.loss_chunk=0 \
    --out "$OUT/mfu.md" 2>&1 | tee -a "$OUT/mfu.log"
