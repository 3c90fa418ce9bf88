#!/usr/bin/env bash
# Set up the environment, then run the whole fastslow study (or its tests).
# See ./run_all.sh --help.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CALLER_DIR="$PWD"
cd "$REPO"

PROFILES="smoke quick full"

usage() {
    cat <<EOF
Usage:
  ./run_all.sh [--profile P] [--force] [-p KEY VALUE ...]
  ./run_all.sh --tests [PYTEST_ARGS ...]
  ./run_all.sh --help

Set-up (both modes): if no virtualenv or conda env is active (VIRTUAL_ENV and
CONDA_PREFIX unset), create ./.venv when it is missing and use it. Run
'pip install -e .' only when pyproject.toml changed since the last install.

Study mode runs notebooks/[0-9][0-9]_*.ipynb in order with papermill into
results/<profile>-<dataset>/notebooks/, then prints the summary table
(python -m fastslow.results show results/<run>).

Options:
  --profile P      smoke | quick | full  (default: \$FASTSLOW_PROFILE, else quick)
  -p KEY VALUE     notebook parameter passed to every notebook (repeatable),
                   e.g. -p dataset flickr8k -p data_dir PATH -p backbone pretrained.
                   '-p profile P' is the same as '--profile P'.
                   The run is named <profile>-<dataset> (dataset default: shapes).
                   Checked before anything runs or is written: every KEY must be a
                   parameter of the notebooks, every VALUE of its type (seed: an
                   integer; None where the default is None), and profile, dataset,
                   backbone and device one of their choices (device: cpu, or cuda
                   when torch sees a GPU); a bad one exits with status 2.
  --force          rerun notebooks that already ran with the same parameters
  --tests          run 'python -m pytest' from the repo root (package tests and
                   notebooks under nbval, smoke profile); arguments after
                   --tests go to pytest; exits with pytest's status.
                   Uses FASTSLOW_PROFILE=smoke unless --profile comes first.
  -h, --help       show this help

Resume: a notebook that succeeded leaves results/<run>/notebooks/.done/<name>.params
(parameters + sha256 of the source notebook). Such a notebook is skipped when
its parameters and source are unchanged, unless --force. Once one notebook
runs, every later notebook runs too (it may read what the earlier one wrote).

Full profile past one machine (the papers' datasets at full size, N GPUs): train the
heavy stages with the command first, into the cache the notebooks then read:
  P="-p profile full -p dataset flickr30k -p data_dir PATH -p backbone pretrained"
  torchrun --nproc_per_node N -m fastslow.stages features \$P      # ranks share the chunks
  torchrun --nproc_per_node N -m fastslow.stages dual_encoder \$P  # DDP, gathered negatives
  python -m fastslow.stages slow \$P                               # one process
  torchrun --nproc_per_node N -m fastslow.stages students \$P      # DDP, after slow
  ./run_all.sh --profile full -p dataset flickr30k -p data_dir PATH -p backbone pretrained
  (add --estimate to a stage to see what one training step costs first; README, "Past one machine")

Environment:
  FASTSLOW_PROFILE     default profile (smoke|quick|full)
  FASTSLOW_NOTEBOOKS   directory of the notebooks to run (default: notebooks)
  FASTSLOW_CACHE       cache of trained models/features (default: .cache/fastslow)
EOF
}

die() { echo "run_all.sh: error: $*" >&2; exit 2; }
die_usage() {
    echo "run_all.sh: error: $*" >&2
    usage | sed -n '1,4p' >&2
    echo "Run './run_all.sh --help' for the options." >&2
    exit 2
}

check_profile() {
    case " $PROFILES " in
        *" $1 "*) ;;
        *) die "unknown profile '$1' (choose one of: ${PROFILES// /, })" ;;
    esac
}

# ---------------------------------------------------------------- arguments
mode=study
profile=""          # set by --profile / -p profile
force=0
keys=()             # -p keys, in order given (last one wins on repeats)
vals=()
test_args=()

while (($#)); do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --tests)
            mode=tests; shift
            test_args=("$@"); break ;;
        --profile)
            (($# >= 2)) || die_usage "--profile needs a value"
            profile="$2"; shift 2 ;;
        --profile=*)
            profile="${1#*=}"; shift ;;
        --force) force=1; shift ;;
        -p|--parameter)
            (($# >= 3)) || die_usage "$1 needs a KEY and a VALUE"
            [[ "$2" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die_usage "bad parameter name '$2'"
            if [[ "$2" == profile ]]; then
                profile="$3"
            elif [[ "$2" == data_dir && "$3" != /* && -e "$CALLER_DIR/$3" ]]; then
                # Notebooks run from notebooks/: a path relative to where the user stands is
                # passed on as an absolute one.
                keys+=("$2"); vals+=("$(cd "$CALLER_DIR/$3" && pwd)")
            else
                keys+=("$2"); vals+=("$3")
            fi
            shift 3 ;;
        *) die_usage "unknown argument '$1'" ;;
    esac
done

if [[ $mode == tests ]]; then
    # Tests use the smoke profile, whatever FASTSLOW_PROFILE the shell exports,
    # unless a profile was asked for explicitly.
    profile="${profile:-smoke}"
    ((force == 0 && ${#keys[@]} == 0)) || die_usage "--force and -p do not apply to --tests"
else
    profile="${profile:-${FASTSLOW_PROFILE:-quick}}"
fi
check_profile "$profile"

# ------------------------------------------------------------------- set-up
if [[ -n "${VIRTUAL_ENV:-}" ]]; then
    ENV_PREFIX="$VIRTUAL_ENV"
elif [[ -n "${CONDA_PREFIX:-}" ]]; then
    ENV_PREFIX="$CONDA_PREFIX"
else
    ENV_PREFIX="$REPO/.venv"
    if [[ ! -x "$ENV_PREFIX/bin/python" ]]; then
        python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
            || die "python3 is $(python3 --version 2>&1); fastslow needs Python >= 3.10"
        echo "== creating virtualenv $ENV_PREFIX"
        python3 -m venv "$ENV_PREFIX"
    fi
    export VIRTUAL_ENV="$ENV_PREFIX"
fi
PY="$ENV_PREFIX/bin/python"
[[ -x "$PY" ]] || die "no python at $PY (active environment: $ENV_PREFIX)"
export PATH="$ENV_PREFIX/bin:$PATH"

# Install only when pyproject.toml (or the repo location) changed since the
# last install into this environment.
STAMP="$ENV_PREFIX/.fastslow-install-stamp"
want_stamp="$( (sha256sum pyproject.toml; echo "$REPO") | sha256sum | cut -d' ' -f1)"
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$want_stamp" ]]; then
    echo "== pip install -e . (into $ENV_PREFIX)"
    "$PY" -m pip install -e "$REPO"
    echo "$want_stamp" > "$STAMP"
fi

# glibc's malloc otherwise keeps returning memory to the OS, which makes CPU
# inference ~1.7x slower on this kind of machine.
TUNE="glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
case ":${GLIBC_TUNABLES:-}:" in
    *":$TUNE:"*) ;;
    *) export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}$TUNE" ;;
esac
export MPLBACKEND=Agg
export FASTSLOW_PROFILE="$profile"
export FASTSLOW_BATCH=1  # no one watches: interactive widgets stay idle (fastslow.plots.search_widget)

if [[ $mode == tests ]]; then
    echo "== python -m pytest ${test_args[*]:-} (FASTSLOW_PROFILE=$profile)"
    exec "$PY" -m pytest ${test_args[@]+"${test_args[@]}"}
fi

# ------------------------------------------------------------------- study
NB_DIR="${FASTSLOW_NOTEBOOKS:-notebooks}"
[[ -d "$NB_DIR" ]] || die "notebook directory '$NB_DIR' not found"
shopt -s nullglob
notebooks=("$NB_DIR"/[0-9][0-9]_*.ipynb)
shopt -u nullglob
((${#notebooks[@]} > 0)) || die "no notebooks matching $NB_DIR/[0-9][0-9]_*.ipynb"

# Effective parameters: last value wins for a repeated key; profile first.
declare -A param=()
for i in "${!keys[@]}"; do param["${keys[$i]}"]="${vals[$i]}"; done
given=(profile "$profile")
params_str="profile=$profile"
while IFS= read -r k; do
    [[ -n "$k" ]] || continue
    given+=("$k" "${param[$k]}")
    params_str+=$'\n'"$k=${param[$k]}"
done < <(printf '%s\n' "${!param[@]}" | LC_ALL=C sort)

# Before anything runs or is written: every key is a notebook parameter, every value has its
# type and is one of its choices (exit 2 naming what is valid). Papermill gets the values typed
# (JSON for -y), so '-p data_dir 8' stays a string.
typed_params="$("$PY" -m fastslow.parameters "$NB_DIR" "${given[@]}")" || exit $?
pm_args=(-y "$typed_params")
dataset="${param[dataset]:-shapes}"
run="$profile-$dataset"

RUN_DIR="results/$run"
OUT_DIR="$RUN_DIR/notebooks"
DONE_DIR="$OUT_DIR/.done"
mkdir -p "$DONE_DIR"

progress=(--no-progress-bar)
[[ -t 1 ]] && progress=(--progress-bar)

echo "== run $run: ${#notebooks[@]} notebooks from $NB_DIR -> $OUT_DIR"
echo "   parameters: ${params_str//$'\n'/, }"
t_total=$SECONDS
rerun_rest=$force
for src in "${notebooks[@]}"; do
    file="$(basename "$src")"
    name="${file%.ipynb}"
    out="$OUT_DIR/$file"
    stamp="$DONE_DIR/$name.params"
    stamp_text="$params_str"$'\n'"notebook_sha256=$(sha256sum "$src" | cut -d' ' -f1)"

    if ((rerun_rest == 0)) && [[ -f "$stamp" && -f "$out" ]] \
            && [[ "$(cat "$stamp")" == "$stamp_text" ]]; then
        echo "skip $name (done with same parameters)"
        continue
    fi
    rerun_rest=1
    rm -f "$stamp"

    echo "== $name"
    t0=$(date +%s.%N)
    # The kernel keeps its default inline matplotlib backend (MPLBACKEND
    # unset), so figures are stored in the executed copy; it is headless anyway.
    if env -u MPLBACKEND "$PY" -m papermill "${progress[@]}" -k python3 \
            --cwd "$(dirname "$src")" "${pm_args[@]}" "$src" "$out"; then
        status=0
    else
        status=$?
    fi
    secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    if ((status != 0)); then
        echo >&2
        echo "FAILED: $name (exit $status, after ${secs}s)" >&2
        echo "  executed copy (with the error): $out" >&2
        exit "$status"
    fi
    printf '%s\n' "$stamp_text" > "$stamp"
    echo "   $name: ${secs}s"
done
echo "== all notebooks done in $((SECONDS - t_total))s"
echo

"$PY" -m fastslow.results show "$RUN_DIR"
