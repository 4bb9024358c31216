#!/usr/bin/env bash
# Build, test, sanitize and benchmark cram_ext on a GPU machine in one go, writing
# logs and JSON under $OUT (default ./device_out). Stages run in the order given
# (default: all); a failing stage is reported and the next one still runs.
#   bash scripts/device_check.sh build test sanitize bench
#   bash scripts/device_check.sh build test_cuda         (the CUDA test cases only)
#   FUZZ_BUDGET=150 bash scripts/device_check.sh build fuzz_memcheck   (seconds per op; FUZZ_OPS=metaplastic for one)
#   PROFILE_SHAPE=32,512,4,64,128 bash scripts/device_check.sh build profile_metaplastic   (ncu)
#   bash scripts/device_check.sh build profile_attention   (ncu of the routed-attention kernels)
# Wheels placed in .whl/ (fla-core, nvidia-cutlass) are installed to /tmp/site first.
# An A/B of a kernel change in one call: scripts/device_ab.sh.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-$PWD/device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! compgen -G ".whl/nvidia_cutlass-*.whl" >/dev/null; then
  echo "no .whl/nvidia_cutlass-*.whl: the device has no internet, so the CUDA build needs the CUTLASS wheel carried" \
       "(here: python3 -m pip download --no-deps nvidia-cutlass -d .whl, then carry .whl)" >&2
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# pytest-xdist (on the device image) runs the test files in PYTEST_WORKERS processes: the CUDA
# suite alone took more than 200 s of a 600-s call in one process.
xdist=()
python3 -c "import xdist" 2>/dev/null && xdist=(-n "${PYTEST_WORKERS:-8}" -p no:cacheprovider)
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build test sanitize bench)
summary=()

run_stage() {  # name, command...  (each stage is cut at STAGE_TIMEOUT seconds)
  local name=$1; shift
  local t0=$SECONDS
  timeout "${STAGE_TIMEOUT:-400}" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-22s rc=%-3s %4ss' "$name" "$rc" $((SECONDS - t0)))")
  tail -n 15 "$OUT/$name.log"
}

# The routed-attention CUDA cases again with the SM80 kernels forced (on Hopper at D = 128 the
# default is sm_90a), so that both kernel sets are tested there.
test_sm80_kernels() {
  CRAM_ROUTED_ATTENTION_SM80=1 run_stage pytest_cuda_sm80 python3 -m pytest python_tests/test_routed_attention.py \
    python_tests/test_nn.py python_tests/test_compile.py python_tests/test_fuzz.py -q -rs -k cuda "${xdist[@]}"
}

for stage in "${stages[@]}"; do
  case $stage in
    build)
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
      # The device image's Python links extensions with its /opt/gcc/bin/g++ wrapper,
      # which puts parts of libstdc++ into the extension; they clash with the libstdc++
      # torch loaded (a segfault in the first exception message formatting an integer).
      # Compile and link with the system g++ instead.
      if [ -x /opt/gcc/bin/g++ ] && [ -x /usr/bin/g++ ]; then
        cat /opt/gcc/bin/g++ > "$OUT/opt_gcc_wrapper.log"
        export CC=/usr/bin/gcc CXX=/usr/bin/g++ LDSHARED="/usr/bin/g++ -shared"
      fi
      run_stage build env MAX_JOBS=${MAX_JOBS:-16} python3 -m pip install --no-build-isolation -e . -v
      python3 -c "import cram_ext, json; print(json.dumps(cram_ext.build_info()))" | tee "$OUT/build_info.json" ;;
    test)
      run_stage pytest python3 -m pytest python_tests -q -rs "${xdist[@]}"
      test_sm80_kernels ;;
    test_cuda)  # the CUDA cases only (about 700; the CPU ones run in CI): for a short call
      run_stage pytest_cuda python3 -m pytest python_tests -q -rs -k cuda "${xdist[@]}"
      test_sm80_kernels ;;
    sanitize)
      run_stage check_scan_route python3 python_tests/cuda_memcheck_scan_route.py
      run_stage memcheck_scan_route compute-sanitizer --tool memcheck --error-exitcode 3 \
        python3 python_tests/cuda_memcheck_scan_route.py --quick
      if [ -f python_tests/cuda_attention_check.py ]; then
        run_stage check_attention python3 python_tests/cuda_attention_check.py
        run_stage memcheck_attention compute-sanitizer --tool memcheck --error-exitcode 3 \
          python3 python_tests/cuda_attention_check.py --quick -k t37
        run_stage racecheck_attention compute-sanitizer --tool racecheck --error-exitcode 3 \
          python3 python_tests/cuda_attention_check.py --quick -k t37
      fi ;;
    fuzz)  # seeded random cases of every op against the reference, many processes, no sanitizer
      run_stage fuzz python3 python_tests/cuda_fuzz.py --cases "${FUZZ_CASES:-100000}" \
        --time-budget "${FUZZ_BUDGET:-60}" --out "$OUT/fuzz.json" ;;
    fuzz_memcheck)  # the same cases, each worker under compute-sanitizer memcheck
      run_stage fuzz_memcheck python3 python_tests/cuda_fuzz.py --sanitizer memcheck --cases "${FUZZ_CASES:-10000}" \
        --ops "${FUZZ_OPS:-scan,route,attention,decode,metaplastic}" \
        --time-budget "${FUZZ_BUDGET:-150}" --out "$OUT/fuzz_memcheck.json" ;;
    fuzz_racecheck)
      run_stage fuzz_racecheck python3 python_tests/cuda_fuzz.py --sanitizer racecheck --cases "${FUZZ_CASES:-300}" \
        --time-budget "${FUZZ_BUDGET:-100}" --out "$OUT/fuzz_racecheck.json" ;;
    bench_scan) run_stage bench_scan python3 -m bench.scan --device cuda --out "$OUT/gated_scan.json" ;;
    bench_router) run_stage bench_router python3 -m bench.router --device cuda --out "$OUT/route.json" ;;
    bench_attention) run_stage bench_attention python3 -m bench.attention --device cuda --out "$OUT/routed_attention.json" ;;
    bench_metaplastic) run_stage bench_metaplastic python3 -m bench.metaplastic --device cuda --out "$OUT/metaplastic_scan.json" ;;
    bench_metaplastic_quick) run_stage bench_metaplastic_quick python3 -m bench.metaplastic --device cuda --quick \
        --out "$OUT/metaplastic_scan_quick.json" ;;
    profile_metaplastic)  # ncu's counters of the forward and backward kernels, once each (PROFILE_SHAPE: B,T,H,dk,dv)
      run_stage profile_metaplastic ncu --clock-control none --kernel-name regex:"metaplastic_(fwd|bwd)_kernel" \
        --launch-count 2 --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
        --section InstructionStats --section SourceCounters --export "$OUT/metaplastic" --force-overwrite \
        python3 -m bench.metaplastic --device cuda --impl cram --pass fwd_bwd --dtype bf16 --no-check --rep-ms 1 \
        --shape "${PROFILE_SHAPE:-8,4096,8,64,128}" --out "$OUT/profile_metaplastic_bench.json"
      ncu --import "$OUT/metaplastic.ncu-rep" > "$OUT/profile_metaplastic_details.log" 2>&1
      # Instructions executed per SASS line (the build has -lineinfo): where the issue slots go.
      ncu --import "$OUT/metaplastic.ncu-rep" --page source --csv --print-source sass \
        > "$OUT/profile_metaplastic_sass.csv" 2> "$OUT/profile_metaplastic_sass.err" || true ;;
    profile_attention)  # ncu's counters of the routed-attention forward and dK/dV kernels, once each (PROFILE_SHAPE: B,H,T,D)
      run_stage profile_attention ncu --clock-control none --kernel-name regex:"routed_attention_(fwd|bwd_dkdv)_kernel" \
        --launch-count 2 --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
        --section InstructionStats --export "$OUT/attention" --force-overwrite \
        python3 -m bench.attention --device cuda --impl cram --pass fwd_bwd --densities 1 --no-check --rep-ms 1 \
        --shape "${PROFILE_SHAPE:-2,16,8192,128}" --out "$OUT/profile_attention_bench.json"
      ncu --import "$OUT/attention.ncu-rep" > "$OUT/profile_attention_details.log" 2>&1 ;;
    bench)
      run_stage bench_scan python3 -m bench.scan --device cuda --out "$OUT/gated_scan.json"
      run_stage bench_router python3 -m bench.router --device cuda --out "$OUT/route.json"
      run_stage bench_attention python3 -m bench.attention --device cuda --out "$OUT/routed_attention.json" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
# The device tool returns at most 8 files: pack the logs into one.
(cd "$OUT" && tar czf "logs_${stages[0]}.tgz" ./*.log && rm -f ./*.log)
