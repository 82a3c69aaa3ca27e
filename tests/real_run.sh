#!/usr/bin/env bash
# The real-weights run (issue 10) on a GPU machine reached through calls of at most 10 minutes that
# carry at most 64 MiB each: one stage per call, state kept in the home folder and runs/ between calls
# (both survive while the machine stays warm, so the calls must follow each other without a pause).
#
# Here, once:   python -m tests.fixture --split 55000000     # writes .fx1 ... .fx9 (git-ignored)
#               echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: \
#                   --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 -d .whl gguf==0.19.0
# There, in order (call k carries .fxk; 'prepare' also carries .whl with the gguf wheel):
#   bash tests/real_run.sh piece K          # K = 1..9: keep piece K in ~/fx
#   bash tests/real_run.sh prepare          # GPU tests, assemble (md5 checked), dequantise to ~/fixture, base-rate
#                                           # sweep = the study's base evaluation (runs/eval/0.5b/base.json)
#   bash tests/real_run.sh study ANIMALS SEEDS   # e.g. "owl,dolphin" "0,1,2": repeat until it says 'complete'
#   bash tests/real_run.sh teachers ANIMALS # each animal's system-prompted teacher, both evaluators
#   bash tests/real_run.sh report ANIMALS SEEDS   # the report from every evaluation present, teachers included
# Device time (H200, measured rates of 2026-12-01; the session's device time is 30 minutes, so send the
# calls back to back): start ~1-2 min, 9 pieces ~2 min, prepare ~1 min, three teachers of 30,000
# prompts ~2 min, 9 students (3 conditions x 3 seeds, cohorts of 3 at ~120k tokens/s) ~15 min,
# evaluations ~3 min: ~25 minutes.
# Every stage after 'piece' ends by packing the small results (datasets, evaluations, training logs,
# report, stage timings; no adapters or checkpoints) into $OUT/results.tgz, so that whatever the
# device time allowed comes back even if the next call never runs. Here: tar xzf results.tgz
# (each call's archive holds everything so far). A later session that must start a bare machine
# carries runs/datasets and runs/eval back (carry: ["runs/datasets", "runs/eval"]): finished
# datasets and evaluations are then not redone.
set -euo pipefail
stage=${1:?stage: piece, prepare, study, teachers or report}
fx=${FX:-$HOME/fx}
checkpoint=${CHECKPOINT:-$HOME/fixture}
budget=${BUDGET:-540}  # seconds of study per call, under the 600-second call limit
device=${DEVICE:-cuda}
# Smoke runs on a CPU (DEVICE=cpu) shrink the work: e.g. EVAL_ARGS="--questions 2 --samples 3 --dtype fp32"
# STUDY_ARGS="--prompts 8 --keep 4 --allow-fewer --max-new-tokens 40 --max-steps 1 --dtype fp32"
read -r -a eval_args <<< "${EVAL_ARGS:-}"
read -r -a study_args <<< "${STUDY_ARGS:-}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
mkdir -p runs

timed() {  # timed LABEL COMMAND...: run it, append "LABEL seconds status" to runs/stages.tsv
    local label=$1 began status=0
    shift
    began=$(date +%s%N)
    "$@" || status=$?
    printf '%s\t%s\t%d ms\t%s\n' "$(date -u +%FT%TZ)" "$label" $((($(date +%s%N) - began) / 1000000)) "$status" \
        >> runs/stages.tsv
    return "$status"
}

pack() {
    if [ -n "${OUT:-}" ]; then
        tar czf "$OUT/results.tgz" --exclude='*.safetensors' --exclude='checkpoint.pt' --exclude='runs/claims' \
            --exclude='*-chunks' runs
        ls -l "$OUT"
    fi
}

case $stage in
piece)
    mkdir -p "$fx"
    cp ".fx$2/piece" "$fx/$2"
    ls -l "$fx"
    ;;
prepare)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
    if [ "$device" = cuda ]; then  # the fast paths (Triton draw, LoRA backward, kernels) before they are relied on
        timed gpu-tests python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu.py tests/test_kernels.py
    fi
    timed assemble python3 -m tests.fixture --assemble "$fx" --out "$checkpoint"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > runs/device.txt 2>&1 || true
    python3 -c 'import torch; print("torch", torch.__version__)' >> runs/device.txt
    timed sweep python3 -m src.cli sweep --model-path "$checkpoint" --out runs/eval/0.5b/base.json --device "$device" \
        "${eval_args[@]}"
    pack
    ;;
study)
    # SIGTERM at the budget: the next call resumes (finished outputs kept, training from its checkpoint).
    status=0
    timed "study $2 seeds $3" timeout "$budget" python3 -m src.cli study --model-path "$checkpoint" --sizes 0.5b \
        --animals "$2" --seeds "$3" --device "$device" --slots 1024 "${study_args[@]}" \
        2> >(tee -a runs/study.log >&2) || status=$?
    pack
    if [ "$status" = 0 ]; then echo "study: complete"; elif [ "$status" = 124 ]; then echo "study: paused at the budget, call again"; else exit "$status"; fi
    ;;
teachers)
    for animal in ${2//,/ }; do
        timed "teacher $animal evaluation" python3 -m src.cli evaluate --size 0.5b --model-path "$checkpoint" \
            --base --teacher-prompt "$animal" --device "$device" "${eval_args[@]}"
    done
    pack
    ;;
report)
    timed report python3 -m src.cli study --model-path "$checkpoint" --sizes 0.5b --animals "$2" --seeds "$3" \
        --report-only
    pack
    ;;
*)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac
