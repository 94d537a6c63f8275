#!/usr/bin/env bash
# The GPU run owed by issues 3 and 5, prepared as one call of the device tool (about 7 min on an
# H100/H200; the script stops itself within DSF_BENCH_BUDGET = 570 s, each step within its own
# limit, so a stuck step still leaves the others' numbers):
#
#   here:   bash bench/gpu_wheels.sh           # once: the packages the GPU machine lacks
#   there:  run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=600)
#
#   1. environment: card, driver, torch; the carried packages import
#   2. correctness on the GPU: the inference, pretraining, fine-tuning and augmentation tests on
#      cuda (DSF_TEST_DEVICE=cuda). Left out here (make test runs them on the CPU): the resume
#      tests (cuDNN kernels are not bitwise deterministic, and the issue asks them on the CPU)
#      and the two-process DDP test (two ranks on one card)
#   3. whole-slide inference, 40k x 40k synthetic 40x slide (made while step 2 runs): HookNet in
#      bf16 at batch 256 (target under 20 s); the pipeline alone (stub model) under py-spy
#      (summarised by bench/pyspy_top.py)
#   4. patch extraction of that slide with every core (and the store for step 5)
#   5. pretraining at batch 32, ResNet-18: loader, augmentation (eager and with the compiled
#      colour pass the trainer uses), model step, the torch ops one step dispatches, where 5
#      steps spend the GPU's time (by kernel category and kernel), end to end (target 320
#      samples/s)
#   6. the reader threads' GIL cost (bench/gil.py), the HookNet forward alone, and last, with
#      what time is left, pretraining with torch.compile
#
# DSF_BENCH_PARTS names the steps to run, in order (default: tests inference extraction
# pretraining gil forward compile; the environment step always runs; pretraining and compile
# train on the store the extraction step writes), DSF_BENCH_TESTS the test files (DSF_BENCH_K
# their -k selection, default "not resume and not ddp"): a shorter
# second call, e.g. DSF_BENCH_PARTS="tests extraction compile_encoders compile pretraining"
# (not in the default list: compile_encoders, torch.compile of the two encoders only; fp16,
# the eager step in AMP float16, to see whether batch norm then runs through cuDNN; compile_ro,
# the model compiled in mode reduce-overhead, replayed as CUDA graphs; loader, bench/loader.py:
# the tile loader against torch's DataLoader on the extracted store).
#
# Everything goes to $OUT/gpu.log. On the CPU, as a dry run of the script itself:
#   DSF_BENCH_DEVICE=cpu DSF_BENCH_SIZE=6000 DSF_BENCH_BATCH=2 DSF_BENCH_STEPS=2 PY=.venv/bin/python \
#     OUT=bench/out/dry bash bench/gpu.sh
set -uo pipefail
OUT=${OUT:-bench/out/gpu}
DEVICE=${DSF_BENCH_DEVICE:-cuda}
SIZE=${DSF_BENCH_SIZE:-40000}
BATCH=${DSF_BENCH_BATCH:-32}
STEPS=${DSF_BENCH_STEPS:-30}
PY=${PY:-python3}
CORES=$(nproc)
PARTS=${DSF_BENCH_PARTS:-tests inference extraction pretraining gil forward compile}
TESTS=${DSF_BENCH_TESTS:-tests/test_infer.py tests/test_pretrain.py tests/test_finetune.py \
tests/test_augment.py tests/test_fold.py tests/test_tiles.py}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu.log") 2>&1
TEE=$!
# on exit, close our ends of the pipe and let tee write the last lines before the script ends
trap 'exec >&- 2>&-; wait "$TEE"' EXIT
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

# the carried wheels, where the packages they hold are missing (the device's python has none)
if ! "$PY" -c "import zarr, numcodecs, openslide, imagecodecs, jsonschema" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
    export PATH=/tmp/site/bin:$PATH  # py-spy
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

# the whole script ends within BUDGET seconds (the device tool stops a command at 600 s):
# each step gets its own limit or what is left, whichever is less
BUDGET=${DSF_BENCH_BUDGET:-570}
failed=()
step() { # name, limit in seconds, command...
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - SECONDS))
    [ "$left" -lt "$limit" ] && limit=$left
    echo
    if [ "$limit" -lt 10 ]; then
        echo "## $name: skipped, the time budget is spent"
        failed+=("$name (skipped)")
        return
    fi
    echo "## $name (limit ${limit} s, $(date +%T))"
    local t0=$SECONDS rc=0
    timeout "$limit" "$@" || rc=$?
    echo "## $name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || failed+=("$name")
}

step environment 60 bash -c "
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
    df -h /dev/shm | tail -1  # the tile loader's ring lives there
    $PY -c 'import platform, torch, zarr, openslide, tifffile, dsf
print(\"python\", platform.python_version(), \"torch\", torch.__version__, \"cuda\",
      torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else \"\")
print(\"zarr\", zarr.__version__, \"openslide\", openslide.__library_version__, \"dsf\",
      dsf.__version__, \"cores\", $CORES)
from dsf.devices import amp_dtype
if torch.cuda.is_available():
    print(\"capability\", torch.cuda.get_device_capability(), \"amp\",
          amp_dtype(torch.device(\"cuda\"), True))'"

# the synthetic slide is made on one core while the tests run (about 60 s)
SLIDE=bench/out/synth-$SIZE.tiff
STORE=bench/out/synth-$SIZE.zarr
# the synthetic slide is made on one core while the tests run (about 60 s for 40k x 40k)
timeout 200 "$PY" -c "
import sys; from pathlib import Path; sys.path.insert(0, 'bench')
from extract import _ensure_mask, _ensure_synth
_ensure_mask(_ensure_synth(Path('bench/out'), $SIZE), None, Path('bench/out'))" \
    > "$OUT/synth.log" 2>&1 &
SYNTH=$!
slide_ready() {
    [ -z "$SYNTH" ] && return
    echo
    echo "## synthetic slide and its tissue mask (started with the tests, $(date +%T))"
    local rc=0
    wait "$SYNTH" || rc=$?
    SYNTH=
    cat "$OUT/synth.log"
    echo "## synthetic slide and its tissue mask: exit $rc at $SECONDS s"
    [ "$rc" -eq 0 ] || failed+=("synthetic slide")
}

# the real-slide fixture only needs CMU-1-Small-Region.svs, which the demo data carries (these
# tests took about 180 s on an H200)
part_tests() {
    # shellcheck disable=SC2086  # TESTS is a list of files
    step "correctness tests on $DEVICE" 220 env DSF_TEST_DEVICE="$DEVICE" \
        DSF_REAL_DATA=config/data "$PY" -m pytest -q -p no:cacheprovider $TESTS \
        -k "${DSF_BENCH_K:-not resume and not ddp}"
}
part_inference() {
    slide_ready
    step "inference, HookNet" 120 "$PY" bench/infer.py --sizes "$SIZE" --model hooknet \
        --device "$DEVICE" --batch 256 --threads "$CORES"
    # the pipeline alone (stub model), under py-spy (sampling without pausing the process): its
    # JSON line is the stub run's timing, the profile says where the host's time goes
    step "inference, pipeline alone (stub model), py-spy profile" 90 bash -c "
        py-spy record -r 50 --nonblocking --threads -f raw -o $OUT/stub.pyspy -- $PY \
            bench/infer.py --worker --slide $SLIDE --mask ${SLIDE%.tiff}.mask.tiff --model stub \
            --device $DEVICE --batch 256 --threads $CORES --out bench/out &&
        $PY bench/pyspy_top.py $OUT/stub.pyspy --frames 25 --threads 4"
}
part_extraction() {
    slide_ready
    step extraction 120 "$PY" bench/extract.py --sizes "$SIZE" --threads "$CORES"
}
# bench/pretrain.py on the extracted store: a step's title, its limit, then the variant's options
pretrain_step() {
    local title=$1 limit=$2
    shift 2
    step "pretraining, batch $BATCH$title" "$limit" "$PY" bench/pretrain.py --stores "$STORE" \
        --batch "$BATCH" --steps "$STEPS" --workers $((CORES / 2)) --device "$DEVICE" "$@"
}
part_pretraining() {
    pretrain_step "" 150 --count-ops --profile-steps "${DSF_BENCH_PROFILE:-5}"
}
part_loader() {
    step "tile loader against torch's DataLoader, pinned" 90 "$PY" bench/loader.py \
        --store "$STORE" --workers $((CORES / 2)) --batch "$BATCH"
}
part_gil() {
    step "reader threads vs a launch-bound main thread (GIL)" 40 "$PY" bench/gil.py \
        --threads 4 "$CORES" --seconds 5
}
part_forward() {
    step "inference, HookNet forward alone" 60 "$PY" bench/infer.py --forward-only \
        --model hooknet --device "$DEVICE" --batch 256 --seconds 10
}
# it compiles for minutes: last in the default order, taking what time is left
part_compile() {
    pretrain_step ", torch.compile" 240 --compile
}
part_compile_encoders() {
    pretrain_step ", torch.compile of the encoders only" 200 --compile-encoders
}
part_compile_ro() {
    pretrain_step ", torch.compile mode reduce-overhead (CUDA graphs)" 200 \
        --compile-mode reduce-overhead
}
part_fp16() {
    pretrain_step ", AMP float16" 100 --amp-dtype float16 --profile-steps 5
}

for part in $PARTS; do
    if ! declare -F "part_$part" >/dev/null; then
        echo "## unknown part $part (DSF_BENCH_PARTS)"
        failed+=("$part (unknown)")
        continue
    fi
    "part_$part"
done
kill "$SYNTH" 2>/dev/null

echo
if [ ${#failed[@]} -eq 0 ]; then
    echo "## all steps passed"
else
    echo "## failed: ${failed[*]}"
    exit 1
fi
