#!/usr/bin/env bash
# Runs the numbered stages of kernels/ in order. `bash run_all.sh --help` for the options.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")" || exit 1
# this checkout's own package first, even where another clone is the editable install (its outputs go here)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

preset=${NT_PRESET:-cpu}
data_dir=""
from_stage=""
only_stage=""
stage_args=()

mapfile -t stages < <(ls kernels/[0-9][0-9]_*.py 2>/dev/null | xargs -n1 basename | sed 's/\.py$//' | sort)

usage() {
  cat <<USAGE
Usage: bash run_all.sh [--preset NAME] [--data-dir DIR] [--from STAGE] [--only STAGE] [--force] [--set KEY=VALUE]...

Runs every numbered stage of kernels/ in order. A stage whose outputs are complete is skipped,
so re-running resumes. Stops at the first failing stage. Logs: work/<preset>/logs/<stage>.log
(or \$NT_LOG_DIR).

  --preset NAME     config preset (default: cpu): $(ls configs/*.yaml | xargs -n1 basename | sed 's/\.yaml$//' | grep -v '^base$' | tr '\n' ' ')
  --data-dir DIR    raw data folder (default: \$NT_DATA_DIR, then input/)
  --from STAGE      start at STAGE (number or name, e.g. 01 or fold_structures)
  --only STAGE      run only STAGE
  --force           redo stages even when their outputs are complete
  --set KEY=VALUE   override any config value, e.g. --set fold.n_jobs=1 (repeatable)

Stages:
$(for s in "${stages[@]}"; do printf '  %-22s %s\n' "$s" "$(sed -n '2s/^"""//p' "kernels/$s.py" | cut -c1-100)"; done)
USAGE
}

die() { echo "run_all.sh: $*" >&2; exit 2; }
need() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --preset) need "$@"; preset=$2; shift 2 ;;
    --data-dir) need "$@"; data_dir=$2; shift 2 ;;
    --from) need "$@"; from_stage=$2; shift 2 ;;
    --only) need "$@"; only_stage=$2; shift 2 ;;
    --force) stage_args+=(--force); shift ;;
    --set) need "$@"; stage_args+=(--set "$2"); shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option '$1'" ;;
  esac
done
[ -f "configs/$preset.yaml" ] && [ "$preset" != base ] || die "unknown preset '$preset'"
[ -n "$data_dir" ] && stage_args+=(--data-dir "$data_dir")

# A stage matches its number (01), its full name (01_fold_structures) or its name (fold_structures).
matches() { [ "$1" = "$2" ] || [ "${1%%_*}" = "$2" ] || [ "${1#*_}" = "$2" ]; }
find_stage() {
  for s in "${stages[@]}"; do matches "$s" "$1" && { echo "$s"; return 0; }; done
  die "no stage '$1' (stages: ${stages[*]})"
}
if [ -n "$from_stage" ]; then from_stage=$(find_stage "$from_stage") || exit 2; fi
if [ -n "$only_stage" ]; then only_stage=$(find_stage "$only_stage") || exit 2; fi

# One run at a time per work folder: hold its lock (python -m nucleic.stage lock-path) for the whole run (the stages see
# $NT_RUN_LOCK and go on under it; a stage started by hand meanwhile stops with a clear message).
if command -v flock >/dev/null 2>&1; then
  lock=$("$PY" -m nucleic.stage lock-path --preset "$preset" "${stage_args[@]}") || exit 2
  exec 9>>"$lock"
  if ! flock -n 9; then
    die "another run is using this work folder ($(cat "$lock" 2>/dev/null || echo 'holder unknown')); wait for it to finish or stop it"
  fi
  echo "run_all.sh pid $$, since $(date +%H:%M:%S)" > "$lock"
  export NT_RUN_LOCK="$lock"
fi

selected=()
running=$([ -z "$from_stage" ] && echo yes || echo no)
for stage in "${stages[@]}"; do
  [ "$stage" = "$from_stage" ] && running=yes
  [ "$running" = yes ] || continue
  [ -n "$only_stage" ] && [ "$stage" != "$only_stage" ] && continue
  selected+=("$stage")
done

# Data the selected stages need and the data folder / input/ lack: fetched first (Kaggle API, public
# sources, checksummed), or one line saying what to put where.
"$PY" -m nucleic.download --preset "$preset" "${stage_args[@]}" "${selected[@]}" || exit 2

log_dir=${NT_LOG_DIR:-work/$preset/logs}
mkdir -p "$log_dir"
started=$(date +%s)
report=()
for stage in "${selected[@]}"; do
  log="$log_dir/$stage.log"
  echo "==> $stage (preset $preset, log $log)"
  t0=$(date +%s)
  "$PY" "kernels/$stage.py" --preset "$preset" "${stage_args[@]}" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  elapsed=$(( $(date +%s) - t0 ))
  if [ "$rc" -ne 0 ]; then
    echo "run_all.sh: stage $stage FAILED (exit $rc) after ${elapsed}s; log: $log" >&2
    exit "$rc"
  fi
  status=done
  grep -q ': skipped (' "$log" && status=skipped
  report+=("$(printf '%-24s %-8s %6ss' "$stage" "$status" "$elapsed")")
done
echo "==> summary (preset $preset)"
printf '  %s\n' "${report[@]}"
echo "  total $(( $(date +%s) - started ))s"
