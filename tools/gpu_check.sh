#!/usr/bin/env bash
# Build jax_sprnn with its CUDA module, run the test suite on the GPU and the benchmarks, in one
# command on a machine with an NVIDIA GPU. Logs go to $OUT (or ./out).
#   tools/gpu_check.sh [tests|suite|sanitize|all] [pytest args (default: the whole tests/ folder)]
#   SUITE=paper|sweep|capacity|training|ablation SUITE_ARGS=--quick tools/gpu_check.sh suite
#     (SUITE="gated sweep" SUITE_ARGS_gated=... SUITE_ARGS_sweep=...: arguments per suite)
#     (python benchmarks/run.py --suite ...; 'bench' is another name for 'suite'; all = tests,suite)
#   tools/gpu_check.sh reliability  (10,000-call soak, concurrent threads, reliability tests)
#   tools/gpu_check.sh speech       (the speech example's GPU speed table; wheels from .whl/, which
#     tools/speech_wheels.sh fills;
#     SPEECH_ARGS="--hidden 256 --bench-batches 1" SPEECH_DTYPES=float32 for another layer)
#   TRAIN_ARGS="--steps 300" tools/gpu_check.sh train  (the speech example trains; its log and timing)
#   SPEECH_TRACE_ARGS="--batch 1" tools/gpu_check.sh speechtrace  (the speech example's recurrent
#     layers timed and traced by the JAX profiler: benchmarks/probes/speech_layers.py)
#   tools/gpu_check.sh profile      (Nsight Compute on tools/profile_case.py)
#   KT_CASES="simple 256 0.1 1 float16;bidir 256 0.1 1 float32;bilstm 256 0.1 8 float16" tools/gpu_check.sh kerneltime
#     (the persistent kernel's device time per step, T = 64 against 256: tools/kernel_time.py;
#     KT_CASES_FILE=tools/kt_cases/cluster_layouts.txt reads the cases from a file, one a line;
#     KT_CASES_FILE="a.txt b.txt" from several, in that order)
#   SANITIZER_TOOLS="memcheck" SANITIZER_CASES=small SANITIZER_TIMEOUT=150 tools/gpu_check.sh sanitize
#     (cases: small, wide, gated, paired, tiles, grid: tools/sanitizer_case.py)
#   FIXED_CASES=$'--hidden 2304\n--hidden 1024' tools/gpu_check.sh fixedcost  (short calls' fixed
#     cost, and each kernel of a T=1 call under Nsight Compute: benchmarks/probes/fixed_cost.py;
#     FIXED_NCU_PROGS="ours, [B|dense" picks the programs, FIXED_STALLS=1 adds the persistent
#     kernel's warp stall reasons, FIXED_TRACE=1 FIXED_TAIL=150 each call's events from the JAX
#     profiler)
#   GATED_STEP_CASES=$'--cell gru\n--cell lstm --batch 32' tools/gpu_check.sh gatedstep  (a gated
#     layer's training step by part: benchmarks/probes/gated_backward_step.py)
#   SASS_MATCH=forward tools/gpu_check.sh sass  (the built module's SASS of the matching kernels, and
#     where its local-memory instructions are)
#   BIDIR_CASES=$'--dtype float32\n--dtype float16' tools/gpu_check.sh bidir  (a bidirectional layer
#     in one launch against two calls: benchmarks/probes/bidirectional.py, one case per line)
#   WS_CASES=$'--sets 2 4 8' tools/gpu_check.sh weightsets  (weight sets under vmap in one launch
#     against a launch per set: benchmarks/probes/weight_sets.py, one case per line)
#   tools/gpu_check.sh clusters     (clusters of 1-16 CTAs the GPU holds at once:
#     benchmarks/probes/active_clusters.py)
#   tools/gpu_check.sh final        (tests, multi-GPU sharding, compute-sanitizer)
#   tools/gpu_check.sh tests,suite  (modes joined by commas run in that order)
# DEADLINE_S=540 makes the suites, and kerneltime's chunks, start no case after 540 s from the
# script's start (to fit a 600-s limit on the whole run, for example).
set -uo pipefail
script_start=$(date +%s)
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
# Only 8 files come back from a device run: past that, everything else goes into one archive. At
# the end, and also when a time limit outside stops the script (SIGTERM, SIGINT), so that the logs
# of what did run come back (a sanitizer run lost its logs so, 2026-12-05).
archive_logs() {
  local n_files
  n_files=$(find "$OUT" -maxdepth 1 -type f | wc -l)
  if [ "$n_files" -gt 7 ]; then
    (cd "$OUT" && tar czf logs.tar.gz --exclude logs.tar.gz $(find . -maxdepth 1 -type f -printf '%f\n' | grep -v -E '^(tests.log|device.txt)$') \
      $(find . -mindepth 1 -maxdepth 1 -type d -printf '%f\n') && find . -mindepth 1 -maxdepth 1 ! -name logs.tar.gz ! -name tests.log ! -name device.txt -exec rm -rf {} +)
  fi
}
trap archive_logs EXIT
trap 'echo "gpu_check: stopped by a signal; archiving the logs so far"; exit 143' TERM INT
what=${1:-all}
shift || true
export PYTHONUNBUFFERED=1

echo "== device"; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/device.txt"
python3 -c "import jax, jaxlib, flax; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$OUT/device.txt"

has() { [[ ",$what," == *",$1,"* ]]; }
# Packages the image lacks (the speech example's), carried as wheels in .whl/ when present.
if compgen -G "$PWD/.whl/*.whl" > /dev/null; then  # (the repository root, until the cd below)
  python3 -m pip install --no-deps --no-index -q "$PWD"/.whl/*.whl > "$OUT/wheels.log" 2>&1 || tail -5 "$OUT/wheels.log"
fi
# (checked before the build, which a call without them would spend for nothing)
if (has speech || has train) && ! python3 -c "import soundfile, jiwer, tqdm, matplotlib" 2> /dev/null; then
  echo "the speech example needs soundfile, jiwer, tqdm and matplotlib: run tools/speech_wheels.sh on a"
  echo "machine with internet and carry .whl/ with the checkout"
  exit 3
fi

echo "== build"
start=$(date +%s)
# Only this GPU's architecture (CUDA_ARCHS=all builds the package's default set): the full set takes
# about five minutes of a 16-core machine, one architecture about one.
CUDA_ARCHS=${CUDA_ARCHS:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)-real}
arch_define=()
if [ "$CUDA_ARCHS" != all ]; then arch_define=(-Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$CUDA_ARCHS"); fi
echo "architectures: $CUDA_ARCHS"
export JAX_SPRNN_EXPECTED_CUDA_ARCHS="$CUDA_ARCHS"  # tests/test_devices.py checks the build against it
# KERNEL_DTYPES="f16" compiles only those dtypes' persistent kernels (a third of the build each):
# for kernel-time experiments in one dtype; tests of the others then fail. Always passed, so that a
# warm build directory's cached subset does not outlive the call that asked for it.
echo "kernel dtypes: ${KERNEL_DTYPES:=f32;f16;bf16}"
# (A warm machine's build/gpu may hold objects of another source: touch what changed since.)
bash tools/fresh_build_inputs.sh touch build/gpu
JAX_SPRNN_CUDA=ON python3 -m pip install --no-build-isolation --no-deps "${arch_define[@]}" \
  -Ccmake.define.JAX_SPRNN_KERNEL_DTYPES="$KERNEL_DTYPES" -Ccmake.define.JAX_SPRNN_PTXAS_VERBOSE=ON -Ccmake.define.JAX_SPRNN_LINEINFO=ON -Cbuild-dir=build/gpu -v . > "$OUT/build.log" 2>&1
rc=$?
echo "build rc=$rc in $(( $(date +%s) - start )) s"
if [ $rc -eq 0 ]; then bash tools/fresh_build_inputs.sh record build/gpu; fi
grep -E "ptxas info *: (Used|Compiling|Function properties)|spill" "$OUT/build.log" | sed 's/ptxas info    ://' > "$OUT/ptxas.txt"
if [ $rc -ne 0 ]; then tail -60 "$OUT/build.log"; exit $rc; fi
rm -f "$OUT/build.log"  # keep $OUT for results (the build log is large and the build passed)
# Where a cold build's time goes: the slowest steps (seconds, output) from ninja's log.
if [ -f build/gpu/.ninja_log ]; then
  # (the log keeps every build of a warm folder: each output's last entry is this build's or older)
  awk 'NR > 1 { t[$4] = ($2 - $1) / 1000 } END { for (o in t) printf "%6.1f %s\n", t[o], o }' build/gpu/.ninja_log \
    | sort -rn | head -12 > "$OUT/build_times.txt"
  echo "slowest build steps (s):"; head -4 "$OUT/build_times.txt"
fi
cd /tmp  # import the installed package, not the source tree

if has tests || has all || has final; then
  echo "== tests"
  if [ $# -eq 0 ]; then set -- "$OLDPWD/tests"; fi
  # pytest runs from /tmp: test paths relative to the repository (tests/x.py::name) are made absolute
  test_args=()
  for a in "$@"; do
    if [[ "$a" != -* && "$a" != /* && -e "$OLDPWD/${a%%::*}" ]]; then a="$OLDPWD/$a"; fi
    test_args+=("$a")
  done
  set -- "${test_args[@]}"
  # SIGINT at the time limit: pytest then still prints the failures so far and its summary line.
  timeout -s INT -k 30 "${TESTS_TIMEOUT:-1800}" python3 -m pytest -q -rfEs --durations=8 --rootdir="$OLDPWD" \
    -p no:cacheprovider "$@" 2>&1 | tee "$OUT/tests.log" | tail -30
fi
if has speechtrace; then
  echo "== the speech example's recurrent layers: time and where a call's time goes"
  python3 "$OLDPWD/benchmarks/probes/speech_layers.py" ${SPEECH_TRACE_ARGS:-} --hlo "$OUT/speech_layers_hlo.txt" \
    --out "$OUT/speech_layers.json" 2>&1 | tee "$OUT/speech_layers.txt" | head -30
fi
# A JAX program under Nsight Compute: no preallocation (on 2026-12-07 a kernel-time run's ncu
# process crashed, rc 139, after XLA had failed to preallocate 75% of the GPU it shares with ncu);
# where only our kernel is measured, no autotuning either (it ran past a chunk's time limit there).
under_ncu=(env XLA_PYTHON_CLIENT_PREALLOCATE=false)
under_ncu_ours=("${under_ncu[@]}" XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0")
if has profile; then
  echo "== nsight compute"
  # PROFILE_CASES: ';'-separated "CELL HIDDEN DENSITY BATCH DTYPE STEPS" (tools/profile_case.py).
  # Each case gives the summary sections and, from its report, the hottest SASS instructions by
  # warp-stall samples (tools/ncu_hotspots.py).
  IFS=';' read -ra cases <<< "${PROFILE_CASES:-lstm 1024 0.1 4 float16 256;lstm 1024 0.1 32 float16 256}"
  for cfg in "${cases[@]}"; do
    name="ncu_${cfg// /_}"
    timeout -k 10 "${PROFILE_TIMEOUT:-240}" "${under_ncu_ours[@]}" ncu --clock-control none \
      --kernel-name regex:sprnn_persistent_kernel --launch-skip 2 --launch-count 1 --import-source no \
      --section LaunchStats --section Occupancy --section WarpStateStats --section SchedulerStats \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section SourceCounters \
      -o "/tmp/$name" -f python3 "$OLDPWD/tools/profile_case.py" $cfg > "$OUT/$name.log" 2>&1
    echo "ncu rc=$? $cfg"
    ncu -i "/tmp/$name.ncu-rep" --print-details all > "$OUT/$name.txt" 2>&1
    grep -E "Duration|Stall|Warp Cycles|Issued Ipc|Registers|Achieved|Eligible" "$OUT/$name.txt" | head -24
    ncu -i "/tmp/$name.ncu-rep" --page source --csv --print-source sass > "/tmp/$name.csv" 2>&1
    python3 "$OLDPWD/tools/ncu_hotspots.py" "/tmp/$name.csv" --top "${PROFILE_TOP:-45}" > "$OUT/${name}_sass.txt" 2>&1
    gzip -c "/tmp/$name.csv" > "$OUT/$name.csv.gz"  # every instruction, for tools/ncu_lines.py
    head -c 300 "/tmp/$name.csv"; echo; head -25 "$OUT/${name}_sass.txt"
  done
fi
if has kerneltime; then
  echo "== kernel time (Nsight Compute: device duration and instructions of each launch)"
  # KT_CASES: ';'-separated "CELL HIDDEN DENSITY BATCH DTYPE" (tools/kernel_time.py)
  # (or KT_CASES_FILE: one case a line, e.g. tools/kt_cases/cluster_layouts.txt)
  # (several files, space-separated, run in that order: one call for two queued sweeps)
  if [ -n "${KT_CASES_FILE:-}" ]; then
    KT_CASES=$(for f in $KT_CASES_FILE; do grep -v -E '^\s*(#|$)' "$OLDPWD/$f"; done | paste -sd ';')
  fi
  IFS=';' read -ra cases <<< "${KT_CASES:-simple 256 0.1 1 float16;simple 1024 0.1 8 float16}"
  # KT_CHUNK cases per Nsight Compute process: 28 cases in one crashed ncu (rc 139) with nothing
  # written, 14 at a time ran (H100, 2026-12-06), and once 7 crashed too (2026-12-07, the same
  # build ran them all in two processes ten minutes later); a crash loses only its chunk.
  chunk=${KT_CHUNK:-5}
  csvs=(); manifests=()
  for ((i = 0; i < ${#cases[@]}; i += chunk)); do
    if [ -n "${DEADLINE_S:-}" ] && [ $(( $(date +%s) - script_start )) -ge "$DEADLINE_S" ]; then
      echo "DEADLINE_S=$DEADLINE_S reached: cases $((i + 1))-${#cases[@]} not run"; break
    fi
    n=$((i / chunk)); part=("${cases[@]:i:chunk}")
    rm -f /tmp/kt_manifest_$n.json /tmp/kt_$n.csv  # nothing from an earlier run on a warm machine
    timeout -k 10 "${KT_TIMEOUT:-300}" "${under_ncu_ours[@]}" ncu --csv --print-units base --clock-control none --kernel-name regex:sprnn_persistent_kernel \
      --metrics gpu__time_duration.sum,smsp__inst_executed.sum \
      python3 "$OLDPWD/tools/kernel_time.py" run --manifest /tmp/kt_manifest_$n.json "${part[@]}" > /tmp/kt_$n.csv 2>> "$OUT/kernel_time_run.log"
    echo "ncu rc=$? (cases $((i + 1))-$((i + ${#part[@]})) of ${#cases[@]})"
    csvs+=(/tmp/kt_$n.csv); manifests+=(/tmp/kt_manifest_$n.json)
  done
  if [ ${#csvs[@]} -gt 0 ]; then
    python3 "$OLDPWD/tools/kernel_time.py" summarize "${csvs[@]}" --manifest "${manifests[@]}" \
      --json "$OUT/kernel_time.json" 2>&1 | tee "$OUT/kernel_time.txt"
  fi
fi
if has fixedcost; then
  echo "== fixed cost of short calls"
  # FIXED_CASES: one "--hidden H --batch B ..." per line; each is timed, and its T=1 programs run
  # under Nsight Compute one at a time (each kernel of a call with its device time).
  while IFS= read -r case_args; do
    [ -z "$case_args" ] && continue
    tag=$(echo "$case_args" | tr -c 'a-zA-Z0-9\n' '_' | tr -s '_')
    echo "-- $case_args"
    trace=()  # FIXED_TRACE=1: each T=1 program's calls under the JAX profiler (events per call)
    if [ -n "${FIXED_TRACE:-}" ]; then trace=(--trace /tmp/fixed_traces); fi
    python3 "$OLDPWD/benchmarks/probes/fixed_cost.py" $case_args --out "$OUT/fixed_cost$tag.json" \
      --hlo-dir "$OUT/hlo$tag" "${trace[@]}" 2>&1 | tail -${FIXED_TAIL:-20}
    # (FIXED_NCU_PROGS="" runs none under Nsight Compute)
    IFS='|' read -r -a ncu_progs <<< "${FIXED_NCU_PROGS-ours, [B|dense|sync floor}"
    for prog in "${ncu_progs[@]}"; do
      [ -z "$prog" ] && continue
      timeout -k 10 "${PROFILE_TIMEOUT:-120}" "${under_ncu[@]}" ncu --clock-control none --metrics gpu__time_duration.sum --csv \
        python3 "$OLDPWD/benchmarks/probes/fixed_cost.py" $case_args --ncu --steps 1 --only "$prog" \
        > "/tmp/ncu.csv" 2>&1
      echo "ncu ($prog) rc=$?"
      python3 "$OLDPWD/benchmarks/probes/fixed_cost.py" --summarize-ncu /tmp/ncu.csv 2>&1 | tail -12
    done
    if [ -n "${FIXED_STALLS:-}" ]; then  # where the warps of a T=1 call's persistent kernel wait
      timeout -k 10 "${PROFILE_TIMEOUT:-120}" ncu --clock-control none \
        --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,gpu__time_duration.sum,smsp__inst_executed.sum,sm__cycles_active.avg" \
        --kernel-name regex:sprnn_persistent --launch-skip 1 --launch-count 1 \
        python3 "$OLDPWD/benchmarks/probes/fixed_cost.py" $case_args --ncu --steps 1 --only "ours, [B" \
        > "$OUT/stalls$tag.txt" 2>&1
      echo "ncu stalls rc=$?"
      grep -E "stalled|duration|inst_executed|cycles_active|==ERR|rror" "$OUT/stalls$tag.txt" | sort -k3 -g -r | head -14
    fi
  done <<< "${FIXED_CASES:---hidden 2304}"
fi
if has gatedstep; then
  echo "== gated training step, by part"
  # GATED_STEP_CASES: one "--cell C --hidden H --batch B ..." per line (benchmarks/probes/gated_backward_step.py)
  while IFS= read -r case_args; do
    [ -z "$case_args" ] && continue
    tag=$(echo "$case_args" | tr -c 'a-zA-Z0-9\n' '_' | tr -s '_')
    echo "-- $case_args"
    python3 "$OLDPWD/benchmarks/probes/gated_backward_step.py" $case_args --out "$OUT/gated_step$tag.json" 2>&1 | tail -6
  done <<< "${GATED_STEP_CASES:---cell gru --hidden 1024 --batch 4}"
fi
if has sass; then
  echo "== SASS"
  so=$(python3 -c "import glob, os, jax_sprnn; print(glob.glob(os.path.join(os.path.dirname(jax_sprnn.__file__), '_sprnn_cuda*.so'))[0])")
  cuobjdump -sass "$so" > /tmp/module.sass 2>&1
  python3 "$OLDPWD/tools/sass_local.py" /tmp/module.sass --match "${SASS_MATCH:-sprnn_persistent_kernel}" \
    --dump "$OUT/sass_matched.txt" 2>&1 | tail -40
  gzip -f "$OUT/sass_matched.txt"
fi
if has clusters; then
  echo "== active clusters"
  python3 "$OLDPWD/benchmarks/probes/active_clusters.py" --out "$OUT/active_clusters.json" 2>&1 | tail -8
fi
if has multi || has final; then
  echo "== multi-GPU sharding"
  NCCL_NVLS_ENABLE=0 python3 "$OLDPWD/tools/multi_gpu_check.py" 2>&1 | tee "$OUT/multi_gpu.log" | tail -6
fi
if has suite || has bench || has all; then
  for suite in ${SUITE:-paper}; do  # SUITE may list several, e.g. "training ablation"
    echo "== benchmark suite $suite"
    budget=()
    if [ -n "${DEADLINE_S:-}" ]; then budget=(--budget-s $(( DEADLINE_S - $(date +%s) + script_start ))); fi
    args_var="SUITE_ARGS_$suite"  # per-suite arguments (SUITE_ARGS_sweep=...) override SUITE_ARGS
    python3 "$OLDPWD/benchmarks/run.py" --suite "$suite" --out "$OUT/suite_$suite" ${!args_var:-${SUITE_ARGS:-}} "${budget[@]}" 2>&1 | tee "$OUT/suite_$suite.log" | tail -40
  done
fi
if has reliability; then
  echo "== soak"
  python3 "$OLDPWD/tools/soak.py" --calls ${SOAK_CALLS:-10000} --seconds ${SOAK_SECONDS:-300} --out "$OUT/soak.json" 2>&1 | tee "$OUT/soak.log" | tail -25
  echo "== concurrency"
  python3 "$OLDPWD/tools/concurrency_check.py" --threads 2 --iters 500 --timeout 240 --out "$OUT/concurrency.json" 2>&1 | tee "$OUT/concurrency.log" | tail -12
fi
# A probe of benchmarks/probes/ once per line of its cases; each writes $OUT/<probe>_<n>.json.
run_probe() {  # probe name, cases
  local n=0
  while IFS= read -r case_args; do
    n=$((n + 1))
    python3 "$OLDPWD/benchmarks/probes/$1.py" $case_args --out "$OUT/$1_$n.json" 2>&1 | tail -8
  done <<< "$2"
}
if has bidir; then
  echo "== bidirectional: one launch against two calls"
  run_probe bidirectional "${BIDIR_CASES:---dtype float32}"
fi
if has weightsets; then
  echo "== weight sets under vmap: one launch against a launch per set"
  run_probe weight_sets "${WS_CASES:---dtype float16}"
fi
if has speech; then
  echo "== speech example, GPU speed table"
  for dt in ${SPEECH_DTYPES:-float32 float16}; do
    python3 "$OLDPWD/examples/speech_model.py" --bench-only ${SPEECH_ARGS:---hidden 2048 --density 0.1} --dtype "$dt" \
      --out "$OUT/speech_$dt" 2>&1 | tee "$OUT/speech_$dt.log" | tail -12
  done
fi
if has train; then
  echo "== speech example, training on the GPU (steps/s and the run's wall time)"
  start=$(date +%s)
  timeout -k 10 "${TRAIN_TIMEOUT:-300}" python3 "$OLDPWD/examples/speech_model.py" ${TRAIN_ARGS:-} \
    --out "$OUT/speech_train" > "$OUT/speech_train.log" 2>&1
  echo "train rc=$? in $(( $(date +%s) - start )) s"; grep -v -E "^\s*$" "$OUT/speech_train.log" | tail -25
fi
if has sanitize || has final; then
  echo "== compute-sanitizer"
  # compute-sanitizer 2025.3 segfaulted at JAX's start-up on 2026-11-30 (cupy ran clean under it),
  # whatever the allocator. So first find a setting under which JAX starts at all: each candidate
  # runs a one-op JAX program under memcheck (Python's faulthandler names the call that crashed),
  # and the tools run under the first that exits 0. No XLA autotuning under instrumentation (slow);
  # `timeout -k` because the sanitizer may ignore SIGTERM.
  base_flags="${XLA_FLAGS:-} --xla_gpu_autotune_level=0"
  cand_flags=("$base_flags" "$base_flags --xla_gpu_enable_command_buffer="
              "$base_flags --xla_gpu_enable_command_buffer=")
  # JAX must not preallocate 75% of the GPU: the tools need device memory of their own, and without
  # it XLA's allocations failed and the sanitizer crashed (2026-11-30).
  cand_env=("XLA_PYTHON_CLIENT_PREALLOCATE=false" "XLA_PYTHON_CLIENT_PREALLOCATE=false"
            "XLA_PYTHON_CLIENT_ALLOCATOR=platform CUDA_MODULE_LOADING=EAGER")
  # Only the Python process: XLA compiles by running ptxas, and the tools follow child processes
  # by default (a suspect in the tools' crashes at varying points; 2026-12-05).
  track=()
  if compute-sanitizer --help 2>&1 | grep -q -- --target-processes; then track=(--target-processes application-only); fi
  chosen=""
  for i in "${!cand_flags[@]}"; do
    env_args=("XLA_FLAGS=${cand_flags[$i]}" ${cand_env[$i]})
    timeout -k 5 "${SANITIZER_PROBE_TIMEOUT:-60}" env "${env_args[@]}" compute-sanitizer --tool memcheck "${track[@]}" \
      python3 -X faulthandler -c "import jax, jax.numpy as jnp; print('jax up', jnp.arange(3.0).sum())" \
      > "$OUT/sanitizer_probe$i.log" 2>&1
    rc=$?
    echo "probe $i rc=$rc: ${env_args[*]} | $(grep -E 'jax up|ERROR SUMMARY|Fatal|File' "$OUT/sanitizer_probe$i.log" | head -4 | tr '\n' ' ')"
    if [ $rc -eq 0 ]; then chosen=$i; break; fi
  done
  if [ -z "$chosen" ]; then
    echo "compute-sanitizer: JAX does not start under it in any candidate setting; tools not run"
  else
    for tool in ${SANITIZER_TOOLS:-memcheck racecheck synccheck initcheck}; do
      case $tool in
        memcheck) cases=small,wide,gated; limit=420; opts=(${MEMCHECK_OPTS:-}) ;;
        racecheck) cases=small,gated; limit=300; opts=() ;;
        synccheck|initcheck) cases=small,gated; limit=240; opts=() ;;
        *) echo "unknown sanitizer tool $tool"; continue ;;
      esac
      # The tool itself has crashed (SIGSEGV, no error reported) at varying runs of one case list
      # (2026-12-05): after a crash the list resumes past the run that crashed ("run i: ..." names
      # each before it starts), so one crash costs one run, and the log says which.
      case_args=(--cases "${SANITIZER_CASES:-$cases}" ${SANITIZER_CASE_ARGS:---dtype float16})
      total=$(python3 "$OLDPWD/tools/sanitizer_case.py" "${case_args[@]}" --count)
      skip=0; : > "$OUT/sanitizer_$tool.log"
      while [ "$skip" -lt "$total" ]; do
        timeout -k 10 "${SANITIZER_TIMEOUT:-$limit}" env "${env_args[@]}" compute-sanitizer --tool "$tool" \
          "${track[@]}" "${opts[@]}" --error-exitcode 9 python3 -X faulthandler "$OLDPWD/tools/sanitizer_case.py" \
          "${case_args[@]}" --skip "$skip" >> "$OUT/sanitizer_$tool.log" 2>&1
        rc=$?
        last=$(grep -oE '^run [0-9]+:' "$OUT/sanitizer_$tool.log" | tail -1 | tr -dc 0-9)
        echo "$tool rc=$rc from run $skip $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|sanitizer case' "$OUT/sanitizer_$tool.log" | tail -2 | tr '\n' ' ')"
        if [ "$rc" -ne 139 ] || [ -z "$last" ] || [ "$last" -lt "$skip" ]; then break; fi
        echo "$tool CRASHED (SIGSEGV) in $(grep -E "^run $last:" "$OUT/sanitizer_$tool.log" | tail -1)"
        skip=$((last + 1))
      done
    done
  fi
fi
