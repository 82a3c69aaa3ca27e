#!/usr/bin/env bash
# The real-weights run (issue 10) on a GPU machine reached through calls of at most 10 minutes that
# carry at most 64 MiB each. The work runs as a detached process (setsid) that outlives the calls;
# the calls only bring the pieces in, start it and watch it. State lives in the home folder and in
# runs/, which both survive while the machine stays warm, so the calls must follow each other
# without a pause.
#
# Here, once:   python -m tests.fixture --split 61500000     # writes .fx1 ... .fx8 (git-ignored)
#               echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: \
#                   --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 -d .whl gguf==0.19.0
# There, in order (call k carries .fxk; calls 1 and 'start' also carry .whl):
#   bash tests/real_run.sh piece K            # K = 1..8: keep piece K in ~/fx; K = 1 also starts the probe:
#                                             # GPU equivalence tests, then training benchmarks (cohorts of
#                                             # 3 and 9 in one process, two processes of 3 side by side)
#   bash tests/real_run.sh start ANIMALS SEEDS   # e.g. "owl,auto" "0,1,2": assemble (md5 checked), dequantise
#                                             # to ~/fixture, start the pipeline, then watch it
#   bash tests/real_run.sh watch              # wait (WATCH seconds at most), report progress, pack results:
#                                             # repeat until it says 'pipeline: complete'
# The pipeline (stage 'pipeline', detached): base-rate sweep (= the study's base evaluation), 'auto'
# replaced by the first animal with headroom in that sweep (tests/real_run_choice.py), the system-prompted
# teachers' evaluations beside the study, the study (teacher data, students, their evaluations)
# trained in whichever arrangement the probe measured fastest, then the report.
# On the H200 on 2026-12-01 "owl,auto" "0,1,2" took 1,649 s of device time in 11 calls, the machine's
# start included (reference/real-run-0.5b/README.md).
# Every 'watch' packs the small results (datasets, evaluations, training logs, probe, report, stage
# timings; no adapters or checkpoints) into $OUT/results.tgz: each archive holds everything so far.
# Here: tar xzf results.tgz. A later session that must start a bare machine carries runs/datasets
# and runs/eval back (carry: ["runs/datasets", "runs/eval"]): finished outputs are not redone.
set -euo pipefail
stage=${1:?stage: piece, start, watch (pipeline and probe run detached)}
fx=${FX:-$HOME/fx}
checkpoint=${CHECKPOINT:-$HOME/fixture}
code=${CODE:-$HOME/code}  # the detached processes run from a copy: each call rewrites the working tree
device=${DEVICE:-cuda}
watch_s=${WATCH:-540}
probe_size=${PROBE_SIZE:-0.5b}  # the benchmarks' model shape ('tiny' for a CPU smoke run)
export RUNS=${RUNS:-$PWD/runs}
export SUBLIMINAL_RUNS=$RUNS PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=/tmp/site
# Smoke runs on a CPU (DEVICE=cpu) shrink the work: e.g. EVAL_ARGS="--questions 2 --samples 3 --dtype fp32"
# STUDY_ARGS="--prompts 8 --keep 4 --allow-fewer --max-new-tokens 40 --max-steps 1 --questions 2 --samples 3
# --dtype fp32" PROBE_SIZE=tiny (or PROBE=0: no probe, the default arrangement)
read -r -a eval_args <<< "${EVAL_ARGS:-}"
read -r -a study_args <<< "${STUDY_ARGS:-}"
mkdir -p "$RUNS/probe"

timed() {  # timed LABEL COMMAND...: run it, append "time LABEL milliseconds status" to runs/stages.tsv
    local label=$1 began status=0
    shift
    began=$(date +%s%N)
    "$@" || status=$?
    printf '%s\t%s\t%d ms\t%s\n' "$(date -u +%FT%TZ)" "$label" $((($(date +%s%N) - began) / 1000000)) "$status" \
        >> "$RUNS/stages.tsv"
    return "$status"
}

install_wheels() {  # the carried .whl/ (gguf for the conversion) into /tmp/site; WHEELS=0: use what is installed
    [ "${WHEELS:-1}" = 0 ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
}

detach() {  # detach LOG ARGS...: run this script's stage ARGS from the code copy, outliving the call
    setsid nohup bash "$code/tests/real_run.sh" "${@:2}" > "$1" 2>&1 < /dev/null &
}

pack() {
    [ -n "${OUT:-}" ] || return 0
    # the pipeline writes while we read: a file that changed under tar (status 1) is taken as it was
    tar czf "$OUT/results.tgz" -C "$RUNS/.." --warning=no-file-changed --exclude='*.safetensors' \
        --exclude='checkpoint.pt' --exclude='claims' --exclude='*-chunks' "$(basename "$RUNS")" || [ $? = 1 ]
    ls -l "$OUT"
}

probe_summary() {
    [ -f "$RUNS/probe/done" ] && echo "probe: done" || echo "probe: running"
    tail -n 3 "$RUNS/probe/gpu-tests.log" 2>/dev/null || true
    grep -h "ours" "$RUNS"/probe/bench-*.log 2>/dev/null | grep -v "^Result" || true
}

case $stage in
piece)
    mkdir -p "$fx"
    cp ".fx$2/piece" "$fx/$2"
    if [ "$2" = 1 ]; then
        install_wheels
        rm -rf "$code" && mkdir -p "$code" && cp -r src kernels tests pyproject.toml "$code/"
        [ "${PROBE:-1}" = 0 ] || (cd "$code" && detach "$RUNS/probe/probe.log" probe)
    fi
    ls -l "$fx"
    probe_summary
    ;;
probe)  # detached, from the code copy: are the fast paths right here, and which arrangement is fastest?
    timed gpu-tests python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu.py tests/test_kernels.py \
        > "$RUNS/probe/gpu-tests.log" 2>&1 || touch "$RUNS/probe/gpu-tests.failed"
    bench="python3 -m tests.bench_training --sizes $probe_size --no-reference --device $device"
    timed "bench cohorts 3 and 9" $bench --steps 12 --cohort 3,9 --json-out "$RUNS/probe/bench-alone.json" \
        > "$RUNS/probe/bench-alone.log" 2>&1 || true
    for k in 0 1; do  # two processes of 3 students side by side: their tokens/s summed
        $bench --steps 20 --cohort 3 --json-out "$RUNS/probe/bench-pair$k.json" > "$RUNS/probe/bench-pair$k.log" 2>&1 &
    done
    timed "bench two processes of 3" wait || true
    touch "$RUNS/probe/done"
    ;;
start)
    animals=${2:?animals, e.g. owl,auto} seeds=${3:?seeds, e.g. 0,1,2} began=$(date +%s)
    install_wheels
    timed assemble python3 -m tests.fixture --assemble "$fx" --out "$checkpoint"
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
      python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
      nproc; date -u +%FT%TZ; } > "$RUNS/device.txt"
    for _ in $(seq 60); do [ -f "$RUNS/probe/done" ] || [ "${PROBE:-1}" = 0 ] && break; sleep 5; done
    probe_summary
    rm -rf "$code" && mkdir -p "$code" && cp -r src kernels tests pyproject.toml "$code/"
    (cd "$code" && detach "$RUNS/pipeline.log" pipeline "$animals" "$seeds")
    WATCH=$((watch_s - $(date +%s) + began)) exec bash tests/real_run.sh watch  # this call's WATCH seconds in all
    ;;
pipeline)  # detached, from the code copy
    animals=$2 seeds=$3
    trap 'echo $? > "$RUNS/pipeline.done"' EXIT  # 'watch' stops waiting however this ends
    if [ -f "$RUNS/probe/gpu-tests.failed" ]; then
        echo "GPU tests failed: the pipeline runs without the Triton kernels (SUBLIMINAL_KERNELS=0)"
        export SUBLIMINAL_KERNELS=0
    fi
    timed sweep python3 -m src.cli sweep --model-path "$checkpoint" --out "$RUNS/eval/0.5b/base.json" \
        --device "$device" "${eval_args[@]}" > "$RUNS/sweep.txt" 2>&1
    animals=$(python3 -m tests.real_run_choice animals "$animals" "$RUNS/eval/0.5b/base.json")
    read -r -a arrangement <<< "$(python3 -m tests.real_run_choice arrangement "$RUNS/probe" | tee "$RUNS/arrangement.txt" | head -n 1)"
    echo "animals $animals; training arrangement: ${arrangement[*]:-one process, default cohort}"
    (for animal in ${animals//,/ }; do
        timed "teacher $animal evaluation" python3 -m src.cli evaluate --size 0.5b --model-path "$checkpoint" \
            --base --teacher-prompt "$animal" --device "$device" "${eval_args[@]}" || true
     done) > "$RUNS/teachers.log" 2>&1 &
    status=0
    timed "study $animals seeds $seeds" python3 -m src.cli study --model-path "$checkpoint" --sizes 0.5b \
        --animals "$animals" --seeds "$seeds" --device "$device" --slots 1024 "${arrangement[@]}" "${study_args[@]}" \
        > "$RUNS/study.log" 2>&1 || status=$?
    wait
    timed report python3 -m src.cli study --model-path "$checkpoint" --sizes 0.5b --animals "$animals" \
        --seeds "$seeds" --report-only >> "$RUNS/study.log" 2>&1 || status=$?
    exit "$status"
    ;;
watch)
    began=$(date +%s)
    while [ ! -f "$RUNS/pipeline.done" ] && [ $(($(date +%s) - began)) -lt "$watch_s" ]; do sleep 10; done
    cat "$RUNS/stages.tsv" 2>/dev/null || true
    grep -h "^\[worker\|FAILED\|Error\|error:" "$RUNS/study.log" "$RUNS/pipeline.log" 2>/dev/null | tail -n 30 || true
    tail -n 3 "$RUNS/study.log" "$RUNS/pipeline.log" 2>/dev/null || true
    pack
    if [ -f "$RUNS/pipeline.done" ]; then echo "pipeline: complete (status $(cat "$RUNS/pipeline.done"))"
    else echo "pipeline: running, call watch again"; fi
    ;;
*)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac
