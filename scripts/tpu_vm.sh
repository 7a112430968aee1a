#!/usr/bin/env bash
# Create, set up, run, watch, stop and delete a training run on a Cloud TPU VM or pod slice.
#
#   export TPU_NAME=my-tpu ZONE=europe-west4-a PROJECT=my-project
#   scripts/tpu_vm.sh create --spot
#   scripts/tpu_vm.sh setup
#   scripts/tpu_vm.sh run -- --config configs/minilm_l6.py --workdir gs://my-bucket/runs/l6
#   scripts/tpu_vm.sh logs --follow
#
# `scripts/tpu_vm.sh help` lists every verb and setting. Every gcloud command is
# printed ("+ ...") before it runs; --dry-run prints without running anything.
#
# Until the gcloud check, only bash builtins are used, so a missing gcloud is
# reported clearly even on a PATH with nothing on it.
set -euo pipefail

# The project's home on every worker, the virtual environment setup creates,
# and where run keeps one log per worker and the trainer's pid. $HOME expands
# on the workers, hence the single quotes.
# shellcheck disable=SC2016
readonly REMOTE_DIR='$HOME/embeddings'
# shellcheck disable=SC2016
readonly REMOTE_VENV='$HOME/embeddings-venv'
# shellcheck disable=SC2016
readonly REMOTE_LOGS='$HOME/embeddings-logs'
readonly SOURCE_ARCHIVE='embeddings-src.tar.gz'
# TPU VM images ship Python 3.10; the project needs 3.11 (pyproject.toml), so
# setup makes a venv with uv, which fetches that Python by itself.
readonly PYTHON_VERSION='3.11'
# A SIGTERM'd trainer saves a checkpoint before it exits; stop waits this long.
readonly STOP_WAIT_SECONDS=180

case "$0" in
  */*) REPO_ROOT=$(cd "${0%/*}/.." && pwd) ;;
  *) REPO_ROOT=$(cd .. && pwd) ;;
esac
readonly REPO_ROOT

HELP="Usage: scripts/tpu_vm.sh VERB [FLAGS] [-- ARGS]

Verbs
  create              create the TPU VM (or a queued resource with --queued)
  setup               on every worker: install the project (git clone REPO, or copy
                      this working tree when REPO=local), Python ${PYTHON_VERSION}, jax[tpu] at
                      the version pinned in requirements.txt, and requirements.txt
  run -- ARGS         start 'python train.py ARGS' on every worker (--worker=all),
                      detached from SSH, logging to ~/embeddings-logs/train-HOSTNAME.log.
                      ARGS go to train.py unchanged; --workdir WORKDIR is appended
                      when ARGS have no --workdir. Every worker gets the same workdir,
                      which must be gs:// on a multi-host slice.
  logs                tail each worker's log (--follow to keep following, --worker N)
  status              describe the VM and say whether train.py runs on each worker
  ssh [-- SSH_ARGS]   open a shell on worker 0 (--worker N for another)
  stop                SIGTERM train.py on every worker: it checkpoints, then exits
  delete              delete the TPU VM (with --queued: the queued resource and its VM)
  copy-data SRC DST   copy a data folder or file to DST=gs://BUCKET/PATH
                      (gcloud storage rsync --recursive for folders, cp for files)
  help                this text

Settings (environment variables; the flags override them)
  TPU_NAME          --name NAME               TPU VM name (required)
  ZONE              --zone ZONE               e.g. europe-west4-a, us-central2-b (required)
  PROJECT           --project PROJECT         Google Cloud project id (required)
  ACCELERATOR_TYPE  --accelerator-type TYPE   default v3-8; e.g. v4-32, v5litepod-16, v6e-8
  RUNTIME_VERSION   --version VERSION         default from the accelerator type, as Google
                                              documents: tpu-ubuntu2204-base for v2/v3/v4,
                                              v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv5
                                              for v5p, v2-alpha-tpuv6e for v6e
  REPO              --repo URL|local          default local (copy this working tree)
  WORKDIR           --workdir DIR             train.py's --workdir for run (gs://...)
                    --spot | --preemptible    create a spot / preemptible VM
                    --queued                  create/status/delete a queued resource
                                              (waits for capacity; --spot allowed)
                    --worker N|all            worker for ssh (default 0), logs (all)
                    --follow                  logs: keep following
                    --dry-run                 print the commands, run nothing

Preemption and resuming
  train.py resumes by itself from the last checkpoint in its workdir. After a
  preemption (or stop), issue the same 'run' again with the same workdir; a
  preempted spot/preemptible VM cannot restart, so first: delete, create, setup.

Set CLOUDSDK_CORE_DISABLE_PROMPTS=1 to answer gcloud's confirmations (delete) with yes."

die() {
  printf 'tpu_vm.sh: error: %s\n' "$*" >&2
  exit 1
}

# Sets REPLY to the words quoted for a POSIX shell: safe words as they are,
# others in single quotes. Used for the printed commands and for the command
# lines sent to the workers, so what is printed is exactly what runs.
quote_words() {
  local word quoted=()
  for word in "$@"; do
    if [[ $word =~ ^[[:alnum:]_./:=,@%+-]+$ ]]; then
      quoted+=("$word")
    else
      quoted+=("'${word//\'/\'\\\'\'}'")
    fi
  done
  REPLY="${quoted[*]}"
}

# Prints "+ COMMAND" and runs it, unless --dry-run.
run_cmd() {
  quote_words "$@"
  printf '+ %s\n' "$REPLY" >&2
  if [[ $DRY_RUN == 1 ]]; then
    return 0
  fi
  "$@"
}

default_runtime_version() {
  case "$1" in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}

# A slice of more than 8 chips/cores has several hosts (v2/v3/v4/v5p count
# TensorCores, 8 per host; v5e/v6e count chips and use 4 per host above 8).
is_multihost() {
  local size=${1##*-}
  [[ ! $size =~ ^[0-9]+$ ]] || ((size > 8))
}

# Reads the jax pin from requirements.txt, so the TPU install matches it.
jax_version() {
  local line
  while IFS= read -r line; do
    if [[ $line =~ ^jax==([^[:space:]]+) ]]; then
      echo "${BASH_REMATCH[1]}"
      return 0
    fi
  done <"$REPO_ROOT/requirements.txt"
  die "$REPO_ROOT/requirements.txt has no 'jax==VERSION' line: pin jax there."
}

require_setting() {
  local var=$1 flag=$2 example=$3
  if [[ -z ${!var:-} ]]; then
    die "$var is not set: export $var=$example or pass $flag $example."
  fi
}

check_gcloud() {
  command -v gcloud >/dev/null 2>&1 ||
    die "gcloud not found on PATH: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install), then run 'gcloud auth login'."
  local account
  account=$(gcloud auth list --filter=status:ACTIVE --format='value(account)' 2>/dev/null) ||
    account=""
  [[ -n $account ]] ||
    die "gcloud has no active account ('gcloud auth list' shows none): run 'gcloud auth login' (or activate a service account)."
}

# Common tail of every gcloud compute tpus command.
location_flags() {
  LOCATION=(--zone="$ZONE" --project="$PROJECT")
}

# Runs a shell script on the workers through gcloud ssh. $1: worker (all or N).
on_workers() {
  local worker=$1 script=$2
  run_cmd gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION[@]}" --worker="$worker" \
    --command="$script"
}

# Shell lines the worker scripts share: where the log and pid live, and the pid
# of a running trainer (checked against /proc, so a stale pid file is ignored).
readonly WORKER_PRELUDE="logs=${REMOTE_LOGS}
log=\$logs/train-\$(hostname).log
pidfile=\$logs/train.pid
trainer_pid() { [ -f \"\$pidfile\" ] && pid=\$(cat \"\$pidfile\") && grep -q train.py \"/proc/\$pid/cmdline\" 2>/dev/null && echo \"\$pid\"; }"

verb_create() {
  if [[ $SPOT == 1 && $PREEMPTIBLE == 1 ]]; then
    die "--spot and --preemptible exclude each other: pick one (spot has no 24 h limit)."
  fi
  if [[ $QUEUED == 1 ]]; then
    [[ $PREEMPTIBLE == 0 ]] || die "queued resources have no --preemptible: use --spot."
    local extra=()
    [[ $SPOT == 0 ]] || extra+=(--spot)
    run_cmd gcloud compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" \
      "${LOCATION[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
      --runtime-version="$RUNTIME_VERSION" "${extra[@]}"
    echo "The queued resource waits for capacity; watch it with: scripts/tpu_vm.sh status --queued" >&2
  else
    local extra=()
    [[ $SPOT == 0 ]] || extra+=(--spot)
    [[ $PREEMPTIBLE == 0 ]] || extra+=(--preemptible)
    run_cmd gcloud compute tpus tpu-vm create "$TPU_NAME" "${LOCATION[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${extra[@]}"
  fi
}

# Packs the working tree (tracked and untracked files that git does not ignore,
# so no runs/ or caches) into $1.
pack_working_tree() {
  local archive=$1
  local root
  quote_words "$REPO_ROOT"
  root=$REPLY
  quote_words "$archive"
  printf '+ (cd %s && git ls-files -z --cached --others --exclude-standard | tar --null -czf %s -T -)\n' \
    "$root" "$REPLY" >&2
  [[ $DRY_RUN == 1 ]] && return 0
  (cd "$REPO_ROOT" && git ls-files -z --cached --others --exclude-standard |
    tar --null -czf "$archive" -T -) ||
    die "could not pack $REPO_ROOT with git ls-files + tar (error above); REPO=local needs a git checkout, or set REPO to a git URL."
}

verb_setup() {
  local fetch jax_spec
  jax_spec="jax[tpu]==$(jax_version)"
  if [[ $REPO == local ]]; then
    local archive_dir
    archive_dir=$(mktemp -d)
    # shellcheck disable=SC2064  # expand now: the folder is known now.
    trap "rm -rf '$archive_dir'" EXIT
    pack_working_tree "$archive_dir/$SOURCE_ARCHIVE"
    run_cmd gcloud compute tpus tpu-vm scp "$archive_dir/$SOURCE_ARCHIVE" \
      "$TPU_NAME:$SOURCE_ARCHIVE" "${LOCATION[@]}" --worker=all
    # A fresh copy each time: files deleted here must not linger there.
    fetch="rm -rf ${REMOTE_DIR} && mkdir -p ${REMOTE_DIR} && tar -xzf \$HOME/${SOURCE_ARCHIVE} -C ${REMOTE_DIR}"
  else
    quote_words "$REPO"
    fetch="if [ -d ${REMOTE_DIR}/.git ]; then git -C ${REMOTE_DIR} pull --ff-only; else git clone $REPLY ${REMOTE_DIR}; fi"
  fi
  quote_words "$jax_spec"
  local script="set -e
${fetch}
if [ ! -x \$HOME/.local/bin/uv ]; then
  python3 -m pip install --user --quiet uv ||
    python3 -m pip install --user --quiet --break-system-packages uv ||
    curl -LsSf https://astral.sh/uv/install.sh | sh
fi
[ -x ${REMOTE_VENV}/bin/python ] || \$HOME/.local/bin/uv venv --python ${PYTHON_VERSION} ${REMOTE_VENV}
\$HOME/.local/bin/uv pip install --python ${REMOTE_VENV}/bin/python $REPLY -r ${REMOTE_DIR}/requirements.txt
${REMOTE_VENV}/bin/python -c 'import jax; print(\"jax\", jax.__version__, \"installed on\", __import__(\"socket\").gethostname())'"
  on_workers all "$script"
}

# Sets WORKDIR_IN_ARGS to the --workdir value among train.py's arguments, if any.
find_workdir_arg() {
  WORKDIR_IN_ARGS=""
  local i
  for ((i = 0; i < ${#TRAIN_ARGS[@]}; i++)); do
    case "${TRAIN_ARGS[i]}" in
      --workdir=* | -workdir=*) WORKDIR_IN_ARGS=${TRAIN_ARGS[i]#*=} ;;
      --workdir | -workdir) WORKDIR_IN_ARGS=${TRAIN_ARGS[i + 1]:-} ;;
    esac
  done
}

# The accelerator type of the existing VM (what matters for a run), or the
# setting on a dry run.
actual_accelerator_type() {
  if [[ $DRY_RUN == 1 ]]; then
    echo "$ACCELERATOR_TYPE"
    return 0
  fi
  run_cmd gcloud compute tpus tpu-vm describe "$TPU_NAME" "${LOCATION[@]}" \
    --format='value(acceleratorType)' ||
    die "cannot describe TPU VM $TPU_NAME in $ZONE: create it first (scripts/tpu_vm.sh create)."
}

verb_run() {
  ((${#TRAIN_ARGS[@]} > 0)) ||
    die "run needs train.py's arguments after --, e.g. run -- --config configs/minilm_l6.py --workdir gs://BUCKET/runs/l6"
  find_workdir_arg
  local workdir=$WORKDIR_IN_ARGS args=("${TRAIN_ARGS[@]}")
  if [[ -n $workdir && -n $WORKDIR && $workdir != "$WORKDIR" ]]; then
    die "two workdirs: WORKDIR/--workdir is $WORKDIR but train.py's arguments say $workdir; keep one."
  fi
  if [[ -z $workdir ]]; then
    [[ -n $WORKDIR ]] ||
      die "no workdir: export WORKDIR=gs://BUCKET/runs/NAME, pass --workdir before --, or put --workdir in train.py's arguments."
    workdir=$WORKDIR
    args+=(--workdir "$workdir")
  fi
  local accelerator
  accelerator=$(actual_accelerator_type)
  if [[ $workdir != gs://* ]]; then
    if is_multihost "$accelerator"; then
      die "workdir $workdir is not a gs:// path, but $accelerator has several hosts: all of them must checkpoint to one place. Use gs://BUCKET/PATH."
    fi
    echo "tpu_vm.sh: note: the local workdir $workdir is lost with the VM (delete, preemption); gs:// keeps it." >&2
  fi
  quote_words "${args[@]}"
  local script="set -e
${WORKER_PRELUDE}
[ -x ${REMOTE_VENV}/bin/python ] || { echo \"\$(hostname): no ${REMOTE_VENV}: run scripts/tpu_vm.sh setup first\" >&2; exit 1; }
if pid=\$(trainer_pid); then echo \"\$(hostname): train.py is already running (pid \$pid): scripts/tpu_vm.sh stop first\" >&2; exit 1; fi
mkdir -p \"\$logs\"
cd ${REMOTE_DIR}
setsid nohup ${REMOTE_VENV}/bin/python train.py $REPLY >>\"\$log\" 2>&1 </dev/null &
echo \$! >\"\$pidfile\"
echo \"\$(hostname): started train.py (pid \$!), log \$log\""
  on_workers all "$script"
  echo "Follow the logs with: scripts/tpu_vm.sh logs --follow" >&2
}

verb_logs() {
  local tail_flags="-n 50"
  [[ $FOLLOW == 0 ]] || tail_flags+=" -F"
  local script="${WORKER_PRELUDE}
[ -f \"\$log\" ] || { echo \"\$(hostname): no log yet (\$log): start a run with scripts/tpu_vm.sh run\" >&2; exit 1; }
tail $tail_flags \"\$log\" | sed -u \"s/^/[\$(hostname)] /\""
  on_workers "${WORKER:-all}" "$script"
}

verb_status() {
  if [[ $QUEUED == 1 ]]; then
    run_cmd gcloud compute tpus queued-resources describe "$TPU_NAME" "${LOCATION[@]}"
    # Until the queued resource is provisioned there is no VM to describe.
    run_cmd gcloud compute tpus tpu-vm describe "$TPU_NAME" "${LOCATION[@]}" || {
      echo "No TPU VM $TPU_NAME yet: the queued resource has not provisioned it." >&2
      return 0
    }
  else
    run_cmd gcloud compute tpus tpu-vm describe "$TPU_NAME" "${LOCATION[@]}"
  fi
  local script="${WORKER_PRELUDE}
if pid=\$(trainer_pid); then state=\"train.py running (pid \$pid)\"; else state='train.py not running'; fi
last=''
[ ! -f \"\$log\" ] || last=\$(tail -n 1 \"\$log\")
echo \"\$(hostname): \$state; last log line: \$last\""
  on_workers all "$script"
}

verb_stop() {
  local script="${WORKER_PRELUDE}
if ! pid=\$(trainer_pid); then echo \"\$(hostname): train.py not running\"; exit 0; fi
kill -TERM \"\$pid\"
echo \"\$(hostname): sent SIGTERM to train.py (pid \$pid); waiting for its checkpoint\"
waited=0
while trainer_pid >/dev/null && [ \$waited -lt ${STOP_WAIT_SECONDS} ]; do sleep 1; waited=\$((waited + 1)); done
if trainer_pid >/dev/null; then echo \"\$(hostname): still running after ${STOP_WAIT_SECONDS} s: see scripts/tpu_vm.sh logs\"; exit 1; fi
echo \"\$(hostname): stopped\""
  on_workers all "$script"
}

verb_ssh() {
  local ssh_args=()
  ((${#TRAIN_ARGS[@]} == 0)) || ssh_args=(-- "${TRAIN_ARGS[@]}")
  run_cmd gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION[@]}" --worker="${WORKER:-0}" \
    "${ssh_args[@]}"
}

verb_delete() {
  if [[ $QUEUED == 1 ]]; then
    run_cmd gcloud compute tpus queued-resources delete "$TPU_NAME" "${LOCATION[@]}" --force
  else
    run_cmd gcloud compute tpus tpu-vm delete "$TPU_NAME" "${LOCATION[@]}"
  fi
}

verb_copy_data() {
  ((${#POSITIONAL[@]} == 2)) ||
    die "copy-data needs SRC and DST: copy-data data/ gs://BUCKET/PATH (got ${#POSITIONAL[@]} arguments)."
  local src=${POSITIONAL[0]} dst=${POSITIONAL[1]}
  [[ $dst == gs://* ]] || die "copy-data: DST must be gs://BUCKET/PATH, got '$dst'."
  if [[ $src == gs://* || -d $src ]]; then
    run_cmd gcloud storage rsync --recursive "$src" "$dst"
  elif [[ -f $src ]]; then
    run_cmd gcloud storage cp "$src" "$dst"
  else
    die "copy-data: SRC '$src' is neither a folder, a file nor a gs:// path."
  fi
}

# Reads the flags (before or after the verb) into the settings; `--` ends them.
parse_args() {
  VERB=""
  POSITIONAL=()
  TRAIN_ARGS=()
  local flag value
  while (($# > 0)); do
    case "$1" in
      --) shift; TRAIN_ARGS=("$@"); break ;;
      --spot) SPOT=1 ;;
      --preemptible) PREEMPTIBLE=1 ;;
      --queued) QUEUED=1 ;;
      --dry-run) DRY_RUN=1 ;;
      --follow) FOLLOW=1 ;;
      -h | --help) VERB=help ;;
      --name* | --zone* | --project* | --accelerator-type* | --version* | --repo* | --workdir* | --worker*)
        if [[ $1 == *=* ]]; then
          flag=${1%%=*} value=${1#*=}
        else
          flag=$1
          (($# > 1)) || die "$flag needs a value."
          value=$2
          shift
        fi
        case "$flag" in
          --name) TPU_NAME=$value ;;
          --zone) ZONE=$value ;;
          --project) PROJECT=$value ;;
          --accelerator-type) ACCELERATOR_TYPE=$value ;;
          --version) RUNTIME_VERSION=$value ;;
          --repo) REPO=$value ;;
          --workdir) WORKDIR=$value ;;
          --worker) WORKER=$value ;;
          *) die "unknown flag $1: see scripts/tpu_vm.sh help." ;;
        esac
        ;;
      -*) die "unknown flag $1: see scripts/tpu_vm.sh help." ;;
      *)
        if [[ -z $VERB ]]; then VERB=$1; else POSITIONAL+=("$1"); fi
        ;;
    esac
    shift
  done
}

main() {
  TPU_NAME=${TPU_NAME:-} ZONE=${ZONE:-} PROJECT=${PROJECT:-}
  ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v3-8} RUNTIME_VERSION=${RUNTIME_VERSION:-}
  REPO=${REPO:-local} WORKDIR=${WORKDIR:-} WORKER=""
  SPOT=0 PREEMPTIBLE=0 QUEUED=0 DRY_RUN=0 FOLLOW=0
  parse_args "$@"
  [[ -n $RUNTIME_VERSION ]] || RUNTIME_VERSION=$(default_runtime_version "$ACCELERATOR_TYPE")

  case "$VERB" in
    "" | help)
      printf '%s\n' "$HELP"
      return 0
      ;;
    create | setup | run | logs | status | ssh | stop | delete | copy-data) ;;
    *) die "unknown verb '$VERB': use one of create, setup, run, logs, status, ssh, stop, delete, copy-data, help." ;;
  esac
  if [[ $VERB != copy-data ]]; then
    ((${#POSITIONAL[@]} == 0)) || die "$VERB takes no arguments, got: ${POSITIONAL[*]} (train.py's go after --)."
    require_setting TPU_NAME --name my-tpu
    require_setting ZONE --zone europe-west4-a
    require_setting PROJECT --project my-project
    location_flags
  fi
  if ((${#TRAIN_ARGS[@]} > 0)) && [[ $VERB != run && $VERB != ssh ]]; then
    die "$VERB takes no arguments after --."
  fi
  if [[ $DRY_RUN == 0 ]]; then
    check_gcloud
  fi
  "verb_${VERB//-/_}"
}

main "$@"
