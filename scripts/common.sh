# Shared machinery of the experiment scripts (scripts/table*.sh, scripts/fig*.sh).
#
# An experiment script sets DEFAULT_SEEDS, sources this file, calls `setup "$@"`, then
# lists its runs and ends with `launch`:
#
#   DEFAULT_SEEDS="0 1 2"
#   source "$(dirname "$0")/common.sh"
#   setup "$@"
#   experiment table2                       # runs go to $OUT/table2/<method>/<run-name>/
#   for seed in $SEEDS; do
#     run "$seed" cifar100-resnet32-wrn_16_2-D train_switokd.py --dataset cifar100 --student resnet32 --teacher wrn_16_2
#   done
#   barrier                                 # the runs below wait for those above
#   launch
#
# `run SEED NAME SCRIPT FLAGS...` adds one run named NAME-seedSEED with --seed SEED;
# scripts/launch.py then skips it if finished, resumes it if interrupted, and runs the
# independent runs in parallel, one per GPU (or, with --slurm, one Slurm job each). Every
# script accepts the options below (environment variables in brackets); everything after
# `--` is added to every run. `after_runs CMD...` after `launch` runs CMD over the finished
# runs (a figure script's plot).

usage() {
  cat <<EOF
usage: $(basename "$0") [options] [-- extra training flags]

  --data-root DIR      dataset folder                               [DATA_ROOT, default ./data]
  --out DIR            output root; runs go to DIR/<experiment>/    [OUT, default runs; with --smoke runs-smoke]
  --seeds "0 1 2"      seeds                                        [SEEDS, default "$DEFAULT_SEEDS"]
  --gpus "0 1"         GPU ids, one run per id at a time            [GPUS, default all visible]
  --ngpus N            shorthand for --gpus "0 1 ... N-1"           [NGPUS]
  --gpus-per-run K     GPUs per run (K > 1: torchrun, DDP)          [GPUS_PER_RUN, default $DEFAULT_GPUS_PER_RUN]
  --epochs N           override every recipe's epochs               [EPOCHS]
  --smoke              tiny runs on the same code path (CPU, digits data, small networks, one seed)
                                                                    [SMOKE=1]
  --dry-run            print the commands, run nothing              [DRY_RUN=1]
  -h, --help           this help

Slurm (through submitit: one job per run, a job array per phase; see README):
  --slurm              submit the runs as Slurm jobs; this script waits for them
  --partition NAME     the jobs' partition
  --time LIMIT         time limit per job: minutes, HH:MM:SS or D-HH:MM:SS; a job that
                       reaches it is requeued and resumes from last.pt (default 1440)
  --account NAME       the account to charge
  --sbatch "FLAGS"     more sbatch flags, e.g. "--qos=high --cpus-per-task=8 --mem=64G"
  --slurm-local        the same jobs through submitit's local executor, on this machine
  GPUs per job: --gpus-per-run. --dry-run prints the sbatch header and each job's command.

Finished runs (results.json) are skipped; interrupted ones (last.pt) resume.
Logs: OUT/<experiment>/logs/ (Slurm's: OUT/<experiment>/logs/slurm/).
Summary: python scripts/summarize.py OUT
EOF
}

die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }

setup() {
  SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
  DEFAULT_SEEDS="${DEFAULT_SEEDS:-0 1 2}"
  DEFAULT_GPUS_PER_RUN="${DEFAULT_GPUS_PER_RUN:-1}"
  DATA_ROOT="${DATA_ROOT:-}" OUT="${OUT:-}" SEEDS="${SEEDS:-$DEFAULT_SEEDS}"
  GPUS="${GPUS:-}" NGPUS="${NGPUS:-}" GPUS_PER_RUN="${GPUS_PER_RUN:-$DEFAULT_GPUS_PER_RUN}"
  EPOCHS="${EPOCHS:-}" SMOKE="${SMOKE:-0}" DRY_RUN="${DRY_RUN:-0}" EXTRA=()
  SLURM=() # launch.py's Slurm options, as given
  while (($#)); do
    case "$1" in
      --data-root|--out|--seeds|--gpus|--ngpus|--gpus-per-run|--epochs)
        (($# >= 2)) && [[ "$2" != --* ]] || die "$1 needs a value"
        case "$1" in
          --data-root) DATA_ROOT="$2" ;; --out) OUT="$2" ;; --seeds) SEEDS="$2" ;;
          --gpus) GPUS="$2" ;; --ngpus) NGPUS="$2" ;; --gpus-per-run) GPUS_PER_RUN="$2" ;;
          --epochs) EPOCHS="$2" ;;
        esac
        shift 2 ;;
      --partition|--time|--account|--sbatch)
        (($# >= 2)) || die "$1 needs a value"
        SLURM+=("$1" "$2")
        shift 2 ;;
      --slurm|--slurm-local) SLURM+=("$1"); shift ;;
      --smoke) SMOKE=1; shift ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h|--help) usage; exit 0 ;;
      --) shift; EXTRA=("$@"); break ;;
      *) die "unknown option '$1' (see --help)" ;;
    esac
  done
  [[ "$SEEDS" =~ ^[[:space:]]*[0-9]+([[:space:]]+[0-9]+)*[[:space:]]*$ ]] || die "seeds must be integers, got '$SEEDS'"
  if [[ -n "$NGPUS" ]]; then
    [[ "$NGPUS" =~ ^[1-9][0-9]*$ ]] || die "--ngpus must be a positive integer, got '$NGPUS'"
    GPUS="$(seq -s ' ' 0 $((NGPUS - 1)))"
  fi
  if ((${#SLURM[@]})); then
    [[ " ${SLURM[*]} " == *" --slurm "* || " ${SLURM[*]} " == *" --slurm-local "* ]] ||
      die "${SLURM[0]} needs --slurm"
    [[ -z "$GPUS" && -z "$NGPUS" ]] ||
      die "--gpus and --ngpus choose GPUs of this machine; with --slurm, use --gpus-per-run"
    if [[ "$GPUS_PER_RUN" == all ]]; then
      [[ "$SMOKE" == 1 ]] || die "with --slurm, say how many GPUs each job gets: --gpus-per-run N"
      GPUS_PER_RUN=1
    fi
  fi
  if [[ "$GPUS_PER_RUN" == all ]]; then  # every GPU given, visible or present; 1 without GPUs
    local visible="${CUDA_VISIBLE_DEVICES:-}"
    GPUS_PER_RUN=$(wc -w <<<"${GPUS:-${visible//,/ }}")
    if ((GPUS_PER_RUN == 0)); then
      GPUS_PER_RUN=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU ' || true)
    fi
    ((GPUS_PER_RUN > 0)) || GPUS_PER_RUN=1
  fi
  [[ "$GPUS_PER_RUN" =~ ^[1-9][0-9]*$ ]] ||
    die "--gpus-per-run must be a positive integer or 'all', got '$GPUS_PER_RUN'"
  [[ -z "$EPOCHS" || "$EPOCHS" =~ ^[1-9][0-9]*$ ]] || die "--epochs must be a positive integer, got '$EPOCHS'"
  if [[ "$SMOKE" == 1 ]]; then
    read -r SEEDS _ <<<"$SEEDS"  # one seed
  fi
  if [[ -z "$OUT" ]]; then  # smoke runs never share a root with real ones (the launcher also compares flags)
    OUT=runs
    [[ "$SMOKE" == 1 ]] && OUT=runs-smoke
  fi
  PLAN="$(mktemp "${TMPDIR:-/tmp}/switokd-plan.XXXXXX")"
  trap 'rm -f "$PLAN"' EXIT
  EXPERIMENT=""
}

# experiment NAME: the folder under OUT that the following runs go to.
experiment() { EXPERIMENT="$1"; }

# rundir METHOD NAME: where the run NAME of METHOD writes (e.g. a pretrained teacher for KD).
rundir() { echo "$OUT/$EXPERIMENT/$1/$2"; }

# run SEED NAME SCRIPT FLAGS...: one training run, NAME-seedSEED.
run() {
  local seed="$1" name="$2" script="$3"
  shift 3
  [[ -n "$EXPERIMENT" ]] || die "run before experiment"
  printf '%q ' run "$EXPERIMENT" "$name-seed$seed" "$script" "$@" --seed "$seed" >>"$PLAN"
  echo >>"$PLAN"
}

# table6_runs SEED STUDENT TEACHER: Table 6's runs of one pair (each network alone, DML, KDCL,
# SwitOKD), defined once for scripts/table6_imagenet.sh and scripts/fig6_gradcam.sh. A network
# shared by two pairs is one run: the launcher runs a repeated run once.
table6_runs() {
  local seed="$1" student="$2" teacher="$3" model
  for model in "$teacher" "$student"; do
    run "$seed" "imagenet-$model" train_vanilla.py --dataset imagenet --model "$model"
  done
  local pair="imagenet-$student-$teacher"
  run "$seed" "$pair" train_dml.py --dataset imagenet --models "$student" "$teacher"
  run "$seed" "$pair" train_kdcl.py --dataset imagenet --models "$student" "$teacher"
  run "$seed" "$pair" train_switokd.py --dataset imagenet --student "$student" --teacher "$teacher"
}

# extra_flag FLAG: the value of FLAG among the training flags after `--` (the last one given), or nothing.
extra_flag() {
  local i value=""
  for ((i = 0; i < ${#EXTRA[@]}; i++)); do
    case "${EXTRA[i]}" in
      "$1"=*) value="${EXTRA[i]#"$1"=}" ;;
      "$1") value="${EXTRA[i + 1]:-}" ;;
    esac
  done
  echo "$value"
}

# barrier: the runs after it start when every run before it has ended.
barrier() { echo barrier >>"$PLAN"; }

# launch: hand the plan to scripts/launch.py (see its docstring); with PLAN_SINK=FILE set,
# append the plan to FILE instead (scripts/smoke_all.sh runs every script's plan at once).
launch() {
  if [[ -n "${PLAN_SINK:-}" ]]; then
    cat "$PLAN" >>"$PLAN_SINK"
    return
  fi
  local args=(--out "$OUT" --gpus-per-run "$GPUS_PER_RUN")
  [[ -n "$DATA_ROOT" ]] && args+=(--data-root "$DATA_ROOT")
  [[ -n "$GPUS" ]] && args+=(--gpus "$GPUS")
  [[ -n "$EPOCHS" ]] && args+=(--epochs "$EPOCHS")
  if [[ "$SMOKE" == 1 ]]; then
    args+=(--smoke)
    ((${#SLURM[@]})) || args+=(--in-process)
  fi
  [[ "$DRY_RUN" == 1 ]] && args+=(--dry-run)
  "${PYTHON:-python}" "$SCRIPTS_DIR/launch.py" "$PLAN" "${args[@]}" "${SLURM[@]}" -- "${EXTRA[@]}"
}

# after_runs CMD...: after `launch`, run CMD over the finished runs (e.g. a figure); --dry-run
# prints it; with PLAN_SINK it is skipped (scripts/smoke_all.sh calls the script again later).
after_runs() {
  [[ -z "${PLAN_SINK:-}" ]] || return 0
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "# then, over the finished runs:"
    printf '%q ' "$@" | sed 's/ $//'
    echo
    return 0
  fi
  "$@"
}
