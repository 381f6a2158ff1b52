#!/usr/bin/env bash
# The GPU checks, in one call on a bare single-GPU machine (a few minutes):
#   1. build the extension with its CUDA kernels against the machine's torch;
#   2. the CUDA kernel tests (tests/test_cuda.py) and the CPU op tests beside them;
#   3. single-GPU training, ours against PyG (edge_index and CSR) on the large synthetic
#      graph (1M nodes), through `bns-pipe bench`.
#
#   launch/gpu_check.sh OUT_DIR
#
# Results (device.txt, build.log, pytest.txt, bench/results.{json,md} and plots) go to
# OUT_DIR, marked with the device; GPU_CHECK_GRAPH=tiny makes a quick dry run on a CPU.
# Offline machines without pymetis: put its wheel in .whl/ (see ../shared/gpu.md); it is
# installed into /tmp/site. No step installs from a registry.
set -uo pipefail
out=${1:?usage: launch/gpu_check.sh OUT_DIR}
out=$(mkdir -p "$out" && cd "$out" && pwd)
py=${PYTHON:-python3}
cd "$(dirname "$0")/.."
if ! "$py" -c "import pymetis" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
status=0

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$py" -c "import torch, torch_geometric as g; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'pyg', g.__version__)"
} > "$out/device.txt" 2>&1
cat "$out/device.txt"

echo "== build" >&2
"$py" setup.py build_ext --inplace > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; status=1; }
"$py" -c "from bns_pipe import _ext; print(_ext.describe())" | tee -a "$out/build.log"

echo "== kernel tests" >&2
timeout 240 "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_sparse.py \
    tests/test_sampling.py tests/test_random.py > "$out/pytest.txt" 2>&1 || status=1
tail -5 "$out/pytest.txt"

echo "== single-GPU training: ours vs PyG, synthetic 1M" >&2
timeout 300 "$py" -m bns_pipe bench --graphs "${GPU_CHECK_GRAPH:-large}" --worlds 1 --methods pyg-edge_index pyg-csr ours \
    --epochs 10 --warmup 3 --repeats 2 --out "$out/bench" > "$out/bench.log" 2>&1 || status=1
tail -15 "$out/bench/results.md" 2>/dev/null || tail -20 "$out/bench.log"
exit $status
