#!/usr/bin/env bash
# The real-weights run (issue 10) on a GPU machine reached through calls of at most 10 minutes that
# carry at most 64 MiB each: one stage per call, state kept in the home folder and runs/ between calls.
#
# Here, once:   python -m tests.fixture --split 55000000     # writes .fx1 ... .fx9 (git-ignored)
# There, in order (call k carries .fxk and, where wheels are needed, .whl):
#   bash tests/real_run.sh piece K          # K = 1..9: keep piece K in ~/fx
#   bash tests/real_run.sh prepare          # assemble (md5 checked), dequantise to ~/fixture, base-rate sweep
#   bash tests/real_run.sh study ANIMALS SEEDS   # e.g. "owl,dolphin" "0": repeat until it says 'complete'
#   bash tests/real_run.sh teachers ANIMALS # each animal's system-prompted teacher, both evaluators
#   bash tests/real_run.sh collect [PATHS]  # results (default all of runs/ but adapters) into $OUT
# Every stage after 'piece' needs the wheels of gguf (prepare only) installed with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site
set -euo pipefail
stage=${1:?stage: piece, prepare, study, teachers or collect}
fx=${FX:-$HOME/fx}
checkpoint=${CHECKPOINT:-$HOME/fixture}
budget=${BUDGET:-540}  # seconds of study per call, under the 600-second call limit
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

case $stage in
piece)
    mkdir -p "$fx"
    cp ".fx$2/piece" "$fx/$2"
    ls -l "$fx"
    ;;
prepare)
    python3 -m tests.fixture --assemble "$fx" --out "$checkpoint"
    /usr/bin/time -f "sweep: %e s" python3 -m src.cli sweep --model-path "$checkpoint" --out runs/eval/sweep-0.5b.json --device cuda
    ;;
study)
    # SIGTERM at the budget: the next call resumes (finished outputs kept, training from its checkpoint).
    status=0
    timeout "$budget" python3 -m src.cli study --model-path "$checkpoint" --sizes 0.5b --animals "$2" --seeds "$3" \
        --device cuda --slots 1024 || status=$?
    if [ "$status" = 0 ]; then echo "study: complete"; elif [ "$status" = 124 ]; then echo "study: paused at the budget, call again"; else exit "$status"; fi
    ;;
teachers)
    for animal in ${2//,/ }; do
        /usr/bin/time -f "teacher $animal evaluation: %e s" python3 -m src.cli evaluate --model-path "$checkpoint" \
            --base --teacher-prompt "$animal" --out "runs/eval/0.5b/teacher-$animal.json" --device cuda
    done
    ;;
collect)
    # adapters and checkpoints stay (17+ MB each); pieces of 15 MB: `cat runs.tgz.* | tar xz` joins them
    shift
    tar czf - --exclude='*.safetensors' --exclude='checkpoint.pt' --exclude='runs/claims' "${@:-runs}" | split -b 15m - "$OUT/runs.tgz."
    ls -l "$OUT"
    ;;
*)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac
