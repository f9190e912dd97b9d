#!/usr/bin/env bash
# One device-tool call on the lent H200, budgeted to finish in <= 8 minutes of wall time (plus the machine's
# start): install, then `python -m bench.session` (bench/session.py): ceilings, bf16 correctness of every kernel
# fwd+bwd on the GPU, attention / add_layernorm_modulate / causal_conv3d vs their vendor baselines, one
# STDiT3-XL/2 720p denoising step and one 720p VAE chunk. Every result is appended to $OUT/results.jsonl the
# moment it is measured; each group runs in its own process with a deadline; $OUT/summary.md is printed last.
# Prepare here first: the GPU image (torch 2.11, triton 3.6, huggingface_hub 1.33, safetensors 0.8) lacks
# diffusers, which opensora_fast.models imports (its other needs are there; on Python 3.12 it does not import
# importlib_metadata); av and nvtx are missing too, and this session needs neither:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl diffusers==0.42.1
# then call the device tool with carry [".whl"], timeout_s 600 and the command `bash bench/gpu_session.sh`.
# Results land in $OUT (gpu.txt, plan.json, results.jsonl, summary.md, session.log, install.log): copy them into
# bench/results/session-<gpu>-<date>/ and commit. A run cut short still leaves every line measured so far;
# `python -m bench.session --summarize DIR` rebuilds the table from them.
#
# Options / environment:
#   --dry or DRY=1             tiny shapes on CPU (reference backend; add --interpret for the Triton interpreter),
#                              no install: what CI runs (tests/test_gpu_session.py)
#   SESSION_TOTAL_S=480        wall-time budget of this script; the runner's deadline is what is left of it after
#                              the install (dry: 150); SESSION_DEADLINE_S sets the runner's deadline directly
#   SESSION_GROUP_DEADLINES="stdit3=120,vae_decode=30"   per-group deadlines (defaults in bench/session.py)
#   SESSION_GROUPS="ceilings,stdit3"                     a subset of the groups
set -uo pipefail
export PYTHONUNBUFFERED=1
DRY=${DRY:-0}
EXTRA=()
for arg in "$@"; do
  case "$arg" in
    --dry) DRY=1 ;;
    --interpret) EXTRA+=(--interpret) ;;
    *) echo "gpu_session.sh: unknown argument $arg (expected --dry, --interpret)" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 1
if [ -s "$OUT/results.jsonl" ]; then
  echo "gpu_session.sh: $OUT already holds results.jsonl; give OUT an empty folder" >&2
  exit 2
fi
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
if [ "$DRY" != "0" ]; then
  EXTRA+=(--dry)
  TOTAL=${SESSION_TOTAL_S:-150}
  echo "dry run: no GPU, no install" >"$OUT/gpu.txt"
else
  TOTAL=${SESSION_TOTAL_S:-480}
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >"$OUT/install.log" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  $PY -m pip install -q --no-deps --no-build-isolation -e . >>"$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log"; exit 1; }
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv >"$OUT/gpu.txt" 2>&1
  # fresh compile caches: each first_call_ms includes the compiles its process is the first to need (groups
  # run in order share these caches, so a kernel compiled by the correctness group is a cache hit later)
  export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$(mktemp -d /tmp/triton-cache.XXXXXX)}
  export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$(mktemp -d /tmp/inductor-cache.XXXXXX)}
fi
$PY -c "import torch, triton, platform; print('torch', torch.__version__, 'triton', triton.__version__,
'python', platform.python_version(), 'cuda', torch.version.cuda)" >>"$OUT/gpu.txt" 2>&1
git rev-parse --short HEAD >>"$OUT/gpu.txt" 2>/dev/null
cat "$OUT/gpu.txt"
DEADLINE=${SESSION_DEADLINE_S:-$((TOTAL - SECONDS - 5))}
[ "${DEADLINE%.*}" -lt 10 ] && DEADLINE=10
echo "set-up took ${SECONDS} s; runner deadline ${DEADLINE} s"
GROUPS_ARG=()
[ -n "${SESSION_GROUPS:-}" ] && GROUPS_ARG=(--groups "$SESSION_GROUPS")
# the runner stops starting groups at the deadline; the outer kill is only a backstop (--foreground: the
# runner stays in this process group, so killing the group kills it and, through PDEATHSIG, its worker)
timeout --foreground -s KILL $((${DEADLINE%.*} + 30)) $PY -m bench.session --out "$OUT" --deadline "$DEADLINE" \
  "${GROUPS_ARG[@]}" "${EXTRA[@]}"
rc=$?
if [ $rc -ge 124 ] || [ ! -s "$OUT/summary.md" ]; then
  echo "runner ended with code $rc: summary rebuilt from the results written so far"
  $PY -m bench.session --summarize "$OUT"
fi
exit $rc
