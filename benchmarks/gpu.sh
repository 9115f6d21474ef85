#!/usr/bin/env bash
# The accelerator figures in one prepared run (under 10 minutes on one H100/H200): the experiment's own
# F0/F1 train step in bf16 at per-device batch 128 and 256, the F0 eval step, and timm's dm_nfnet_f0 train
# step (AMP bf16, channels-last and not) on the same GPU. Results go to $OUT (default: runs/gpu_bench).
#
#   pip install -r requirements-gpu.txt && bash benchmarks/gpu.sh    # torch + timm only for the timm rows
#
# Each command prints its own line; bench's JSONs carry every number (images/s, step time, MFU, memory), and
# the table at the end gives images/s and MFU per run: model FLOPs from nfnets.count_flops (3 x forward for
# a train step) over the bf16 matmul peak measured on this GPU, and over the datasheet's dense bf16 peak.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_bench}
mkdir -p "$OUT"
PY=${PY:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"

bench() {  # name, then bench flags
  local name=$1; shift
  timeout 240 $PY -m benchmarks.bench --dtype=bfloat16 --steps=20 --warmup=3 --json="$OUT/$name.json" "$@" \
    2>&1 | tail -n 2 | tee "$OUT/$name.log"
}
bench f0_train_b128 --config=configs/f0.py --batch_size=128 --resolution=192
bench f0_train_b256 --config=configs/f0.py --batch_size=256 --resolution=192
bench f1_train_b128 --config=configs/f1.py --batch_size=128 --resolution=224
bench f1_train_b256 --config=configs/f1.py --batch_size=256 --resolution=224
bench f0_eval_b256 --config=configs/f0.py --mode=eval --batch_size=256 --resolution=256

$PY - "$OUT" <<'SUMMARY' | tee "$OUT/summary.md"
import glob, json, os, sys
# Dense bf16 tensor-core peaks from NVIDIA's datasheets (SXM parts), FLOP/s.
DATASHEET = {'H100': 989.4e12, 'H200': 989.4e12, 'A100': 312e12, 'B200': 2250e12}
kind = open(os.path.join(sys.argv[1], 'gpu.txt')).read()
peak = next((v for k, v in DATASHEET.items() if k in kind), None)
print('| run | images/s | MFU (measured bf16 matmul peak) | MFU (datasheet bf16 peak) |')
print('|---|---:|---:|---:|')
for path in sorted(glob.glob(os.path.join(sys.argv[1], '*.json'))):
  r = json.load(open(path))
  sheet = f"{r['flops_per_sec'] / peak:.1%}" if peak else 'n/a'
  print(f"| {os.path.basename(path)[:-5]} | {r['images_per_sec']:.0f} | {r['mfu']:.1%} | {sheet} |")
SUMMARY

if $PY -c "import torch, timm" 2>/dev/null; then
  timeout 180 $PY - <<'EOF' 2>&1 | tee "$OUT/timm.log"
import time, torch, timm
torch.backends.cudnn.benchmark = True
for channels_last in (False, True):
  for bs in (128, 256):
    m = timm.create_model('dm_nfnet_f0', num_classes=1000).cuda().train()
    if channels_last:
      m = m.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    x = torch.randn(bs, 3, 192, 192, device='cuda')
    if channels_last:
      x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (bs,), device='cuda')
    def step():
      opt.zero_grad(set_to_none=True)
      with torch.autocast('cuda', dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(m(x), y)
      loss.backward(); opt.step()
    for _ in range(5):
      step()
    torch.cuda.synchronize(); times = []
    for _ in range(20):
      t = time.perf_counter(); step(); torch.cuda.synchronize(); times.append(time.perf_counter() - t)
    times.sort()
    print(f'timm dm_nfnet_f0 train bf16 AMP batch {bs} channels_last={channels_last}: '
          f'{bs / times[len(times) // 2]:.0f} images/s')
EOF
else
  echo 'torch/timm not installed: no timm rows' | tee "$OUT/timm.log"
fi
