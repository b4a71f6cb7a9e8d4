#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice with the same config and flags as on a laptop.
#
#   launch/tpu_pod.sh --name=NAME --zone=ZONE --accelerator_type=TYPE \
#       --config=configs/mae.py[:preset] --workdir=DIR [options] [-- train.py flags ...]
#
# Creates the TPU VM NAME (or reuses it when it exists, is READY and of the same type), copies
# this checkout to every worker, installs it there with pip install -e '.[tpu]' (in a Python
# 3.11 venv made by uv: jax 0.10.2 needs Python >= 3.11, the Ubuntu 22.04 TPU VM images ship
# 3.10), starts launch/train.py on all workers with the same flags and streams worker 0's log. Run
# `launch/tpu_pod.sh --help` for the options; --dry_run prints every command ("+ ...", one per
# line) and runs none. Written for bash 3.2 (macOS) and later; tested with bash 5.2.
# shellcheck disable=SC2088  # the ~ in the remote paths expands on the workers
set -euo pipefail

PROG=tpu_pod.sh
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export COPYFILE_DISABLE=1  # macOS tar: no ._* files in the code tarball

# Paths on the workers: the ~ expands there, in the remote shell.
R_CODE='~/fmjax'
R_VENV='~/fmjax-venv'
R_TGZ='fmjax.tgz'
R_LOG='~/fmjax-train.log'
R_PID='~/fmjax-train.pid'

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --name=NAME --zone=ZONE --accelerator_type=TYPE
           --config=configs/<method>.py[:preset] --workdir=DIR [options] [-- train.py flags ...]
       launch/tpu_pod.sh --name=NAME --zone=ZONE --logs|--stop|--delete [--queued]

Train on a Cloud TPU VM pod slice: create or reuse the TPU VM NAME, copy this checkout to every
worker, pip install -e '.[tpu]' on every worker, run launch/train.py on all workers with the same
flags (everything after -- is passed to train.py verbatim), then stream worker 0's log. The run
goes on when you stop watching (Ctrl-C); --logs watches again, --stop ends it.

Required:
  --name=NAME              the TPU VM (queued resource) to create or reuse
  --zone=ZONE              e.g. us-central2-b
  --accelerator_type=TYPE  e.g. v4-32, v5litepod-16, v5p-32, v6e-16 (not needed by --logs/--stop/--delete)
  --config=CONFIG          e.g. configs/mae.py:vit_b16_imagenet (a path inside this checkout)
  --workdir=DIR            the workdir every worker writes to (storage all workers reach)

Options:
  --project=PROJECT        the GCP project (default: gcloud's core/project)
  --runtime_version=V      TPU software version (default by type: v4 tpu-ubuntu2204-base,
                           v5litepod v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
  --queued                 create through a queued resource and wait until it is ACTIVE
  --spot                   Spot capacity (with or without --queued)
  --preemptible            preemptible capacity (without --queued; --spot is the newer name)
  --reserved               use the project's reserved capacity
  --git_url=URL            clone URL on the workers instead of copying this checkout
  --git_ref=REF            with --git_url: the branch, tag or commit to check out
  --python=VERSION         Python of the workers' venv (default 3.11)
  --env=KEY=VALUE          set an environment variable for train.py (repeatable)
  --skip_install           do not copy or install the code (it is there from an earlier run)
  --no_stream              start the run and return without streaming worker 0's log
  --delete_after           delete the TPU VM when the streamed run ends
  --dry_run                print the commands (one per line, prefixed "+ ") and run nothing
  -h, --help               this help

Other actions (instead of training):
  --logs                   stream worker 0's log of the current run
  --stop                   send SIGTERM to the run on every worker (it saves and exits 0)
  --delete                 delete the TPU VM (with --queued: the queued resource and its TPU VM)

Examples:
  launch/tpu_pod.sh --name=fm-pod --zone=us-central2-b --accelerator_type=v4-32 \
      --config=configs/mae.py:vit_b16_imagenet --workdir=/mnt/shared/mae -- --config.total_steps=1000
  launch/tpu_pod.sh --name=fm-pod --zone=us-central2-b --delete
EOF
}

die() {  # a usage problem: one line naming it and the fix, exit 2
  echo "$PROG: error: $*" >&2
  exit 2
}

fail() {  # a problem found while running: one line, exit 1
  echo "$PROG: error: $*" >&2
  exit 1
}

q() {  # quote one word for a POSIX shell: bare when safe, --flag='value' for flags
  local s=$1 out
  case $s in
    '') printf "''"; return ;;
    *[!A-Za-z0-9_./:=@%+,-]*) ;;
    *) printf '%s' "$s"; return ;;
  esac
  case $s in
    --*=*)
      local flag=${s%%=*}
      case $flag in
        *[!A-Za-z0-9_.-]*) ;;
        *) printf '%s=' "$flag"; q "${s#*=}"; return ;;
      esac ;;
  esac
  out="'"
  while [[ $s == *"'"* ]]; do
    out+="${s%%"'"*}'\\''"
    s=${s#*"'"}
  done
  printf '%s' "$out$s'"
}

qall() {  # quote every argument, space-separated
  local first=1 a
  for a in "$@"; do
    if ((first)); then first=0; else printf ' '; fi
    q "$a"
  done
}

trace() {  # print the command ("+ ..."): on stdout in a dry run, else on stderr
  if ((DRY_RUN)); then
    echo "+ $(qall "$@")"
  else
    echo "+ $(qall "$@")" >&2
  fi
}

run() {  # print the command; run it unless --dry_run
  trace "$@"
  if ((!DRY_RUN)); then "$@"; fi
}

# ---------------------------------------------------------------- arguments
NAME="" ZONE="" ACCEL="" CONFIG="" WORKDIR="" PROJECT="" RUNTIME="" GIT_URL="" GIT_REF=""
PYVER=3.11 QUEUED=0 SPOT=0 PREEMPTIBLE=0 RESERVED=0 SKIP_INSTALL=0 NO_STREAM=0 DELETE_AFTER=0
DRY_RUN=0 ACTION=train
ENVS=()
PASS=()

set_action() {
  if [[ $ACTION != train && $ACTION != "$1" ]]; then
    die "--$ACTION and --$1 exclude each other; pass one of them"
  fi
  ACTION=$1
}

while (($#)); do
  arg=$1
  shift
  if [[ $arg == -- ]]; then
    PASS=("$@")
    break
  fi
  case $arg in
    --*=*) key=${arg%%=*} val=${arg#*=} has_val=1 ;;
    *) key=$arg val="" has_val=0 ;;
  esac
  case $key in
    --name | --zone | --accelerator_type | --config | --workdir | --project | --runtime_version | \
      --git_url | --git_ref | --python | --env)
      if ((!has_val)); then
        if (($# == 0)) || [[ $1 == --* ]]; then
          die "$key needs a value, e.g. $key=VALUE"
        fi
        val=$1
        shift
      fi
      [[ -n $val ]] || die "$key is empty; give it a value, e.g. $key=VALUE"
      case $key in
        --name) NAME=$val ;;
        --zone) ZONE=$val ;;
        --accelerator_type) ACCEL=$val ;;
        --config) CONFIG=$val ;;
        --workdir) WORKDIR=$val ;;
        --project) PROJECT=$val ;;
        --runtime_version) RUNTIME=$val ;;
        --git_url) GIT_URL=$val ;;
        --git_ref) GIT_REF=$val ;;
        --python) PYVER=$val ;;
        --env)
          [[ $val =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env=$val is not KEY=VALUE; pass e.g. --env=TFDS_DATA_DIR=gs://bucket/tfds"
          ENVS+=("$val") ;;
      esac ;;
    --queued | --spot | --preemptible | --reserved | --skip_install | --no_stream | --delete_after | \
      --dry_run | --logs | --stop | --delete | -h | --help)
      ((!has_val)) || die "$key takes no value; pass $key alone"
      case $key in
        --queued) QUEUED=1 ;;
        --spot) SPOT=1 ;;
        --preemptible) PREEMPTIBLE=1 ;;
        --reserved) RESERVED=1 ;;
        --skip_install) SKIP_INSTALL=1 ;;
        --no_stream) NO_STREAM=1 ;;
        --delete_after) DELETE_AFTER=1 ;;
        --dry_run) DRY_RUN=1 ;;
        --logs) set_action logs ;;
        --stop) set_action stop ;;
        --delete) set_action delete ;;
        -h | --help) usage; exit 0 ;;
      esac ;;
    --config.* | --check_only*)
      die "$arg is a train.py flag; put it after --, e.g. launch/tpu_pod.sh ... -- $arg" ;;
    *)
      die "unknown argument $arg; see launch/tpu_pod.sh --help" ;;
  esac
done

[[ -n $NAME ]] || die "--name is missing; pass --name=NAME (the TPU VM to create or reuse)"
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name=$NAME is not a valid TPU name; use lowercase letters, digits and -, starting with a letter"
[[ -n $ZONE ]] || die "--zone is missing; pass --zone=ZONE, e.g. --zone=us-central2-b"
if [[ $ACTION != train ]]; then
  ((${#PASS[@]} == 0)) || die "--$ACTION takes no train.py flags; drop what follows --"
fi
if [[ $ACTION == train ]]; then
  [[ -n $ACCEL ]] || die "--accelerator_type is missing; pass e.g. --accelerator_type=v4-32 (or v5litepod-16, v5p-32, v6e-16)"
  case $ACCEL in
    v5e-*) die "--accelerator_type=$ACCEL: the TPU API names v5e slices v5litepod-N; pass --accelerator_type=v5litepod-${ACCEL#v5e-}" ;;
  esac
  [[ $ACCEL =~ ^[a-z0-9]+-[0-9]+$ ]] || die "--accelerator_type=$ACCEL is not a TPU type; pass e.g. --accelerator_type=v4-32"
  if [[ -z $RUNTIME ]]; then
    case $ACCEL in
      v4-*) RUNTIME=tpu-ubuntu2204-base ;;
      v5litepod-*) RUNTIME=v2-alpha-tpuv5-lite ;;
      v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
      v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
      *) die "no default TPU software version for $ACCEL; pass --runtime_version=VERSION" ;;
    esac
  fi
  [[ -n $CONFIG ]] || die "--config is missing; pass --config=configs/<method>.py[:preset], e.g. --config=configs/mae.py"
  [[ -n $WORKDIR ]] || die "--workdir is missing; pass --workdir=DIR, storage every worker reaches"
  case $WORKDIR in
    /* | *://*) ;;
    *) die "--workdir=$WORKDIR is relative: it would land in $R_CODE on each worker, which the next install replaces; pass an absolute path or a gs:// path every worker reaches" ;;
  esac
  if [[ -z $GIT_URL && ! -f $REPO/${CONFIG%%:*} ]]; then
    die "--config=$CONFIG: no file ${CONFIG%%:*} in $REPO; pass a path inside the checkout, e.g. --config=configs/mae.py"
  fi
  if ((QUEUED && PREEMPTIBLE)); then
    die "--preemptible does not work with --queued; pass --spot instead"
  fi
  if ((SPOT && PREEMPTIBLE)); then
    die "--spot and --preemptible exclude each other; pass one of them"
  fi
  [[ -z $GIT_REF || -n $GIT_URL ]] || die "--git_ref needs --git_url; pass --git_url=URL too, or drop --git_ref"
  if ((SKIP_INSTALL)) && [[ -n $GIT_URL ]]; then
    die "--skip_install and --git_url exclude each other; drop one of them"
  fi
  if ((NO_STREAM && DELETE_AFTER)); then
    die "--delete_after needs the streamed log to know when the run ends; drop --no_stream"
  fi
  [[ $PYVER =~ ^3\.[0-9]+$ ]] || die "--python=$PYVER is not a Python version; pass e.g. --python=3.11"
fi

ZF=("--zone=$ZONE")
if [[ -n $PROJECT ]]; then ZF+=("--project=$PROJECT"); fi
TPU=(gcloud compute tpus tpu-vm)
QR=(gcloud compute tpus queued-resources)

# ---------------------------------------------------------------- steps
gcloud_state() {  # prints the state (and type) of the TPU VM or queued resource, "NONE" if absent
  local err out
  err=$(mktemp)
  if out=$("$@" 2>"$err"); then
    rm -f "$err"
    printf '%s\n' "${out:-NONE}"
  elif grep -q 'NOT_FOUND' "$err"; then
    rm -f "$err"
    echo NONE
  else
    cat "$err" >&2
    rm -f "$err"
    fail "could not describe $NAME (gcloud's message is above); check gcloud auth login and --project"
  fi
}

ensure_pod() {
  local state type
  if ((QUEUED)); then
    local describe=("${QR[@]}" describe "$NAME" "${ZF[@]}" '--format=value(state.state)')
    trace "${describe[@]}"
    if ((DRY_RUN)); then
      echo "# when describe finds no queued resource $NAME:"
      state=NONE
    else
      state=$(gcloud_state "${describe[@]}")
    fi
    if [[ $state == NONE ]]; then
      local create=("${QR[@]}" create "$NAME" "--node-id=$NAME" "${ZF[@]}" "--accelerator-type=$ACCEL"
        "--runtime-version=$RUNTIME")
      if ((SPOT)); then create+=(--spot); fi
      if ((RESERVED)); then create+=(--reserved); fi
      run "${create[@]}"
    fi
    if ((DRY_RUN)); then
      echo "# every 30 s until the state is ACTIVE:"
      trace "${describe[@]}"
      return
    fi
    while :; do
      state=$(gcloud_state "${describe[@]}")
      case $state in
        ACTIVE) break ;;
        FAILED | SUSPENDED | SUSPENDING | NONE)
          fail "queued resource $NAME is $state; delete it with launch/tpu_pod.sh --name=$NAME --zone=$ZONE --queued --delete and run again" ;;
        *) echo "$PROG: queued resource $NAME is $state; waiting" >&2; sleep 30 ;;
      esac
    done
  else
    local describe=("${TPU[@]}" describe "$NAME" "${ZF[@]}" '--format=value(state,acceleratorType)')
    trace "${describe[@]}"
    if ((DRY_RUN)); then
      echo "# when describe finds no TPU VM $NAME:"
      state=NONE
    else
      local out
      out=$(gcloud_state "${describe[@]}")
      read -r state type <<<"$out" || true
    fi
    if [[ $state == NONE ]]; then
      local create=("${TPU[@]}" create "$NAME" "${ZF[@]}" "--accelerator-type=$ACCEL" "--version=$RUNTIME")
      if ((SPOT)); then create+=(--spot); fi
      if ((PREEMPTIBLE)); then create+=(--preemptible); fi
      if ((RESERVED)); then create+=(--reserved); fi
      run "${create[@]}"
      return
    fi
    if [[ -n ${type:-} && $type != "$ACCEL" ]]; then
      fail "TPU VM $NAME is a $type, not a $ACCEL; pass --accelerator_type=$type or another --name"
    fi
    [[ $state == READY ]] || fail "TPU VM $NAME is $state, not READY; delete it with launch/tpu_pod.sh --name=$NAME --zone=$ZONE --delete and run again"
    echo "$PROG: reusing TPU VM $NAME ($type, READY)" >&2
  fi
}

ssh_all() {  # a command on every worker
  run "${TPU[@]}" ssh "$NAME" "${ZF[@]}" --worker=all "--command=$1"
}

install_code() {
  local fetch
  if [[ -n $GIT_URL ]]; then
    fetch="rm -rf $R_CODE && git clone -q $(q "$GIT_URL") $R_CODE"
    if [[ -n $GIT_REF ]]; then fetch+=" && git -C $R_CODE checkout -q $(q "$GIT_REF")"; fi
  else
    local tgz="${TMPDIR:-/tmp}"
    tgz="${tgz%/}/fmjax-$NAME.tgz"
    run tar -czf "$tgz" -C "$REPO" --exclude=./.git --exclude=./.venv --exclude=./.ci-venv \
      --exclude=./workdirs --exclude=./runs --exclude=./tmp --exclude=__pycache__ --exclude='*.pyc' \
      --exclude='*.egg-info' --exclude=.pytest_cache --exclude=.jax_cache .
    run "${TPU[@]}" scp "$tgz" "$NAME:$R_TGZ" "${ZF[@]}" --worker=all
    run rm -f "$tgz"
    fetch="rm -rf $R_CODE && mkdir -p $R_CODE && tar -xzf ~/$R_TGZ -C $R_CODE && rm -f ~/$R_TGZ"
  fi
  ssh_all "set -e; $fetch; (python3 -m pip install --user -q uv || python3 -m pip install --user -q --break-system-packages uv); python3 -m uv venv -q --seed --allow-existing --python $PYVER $R_VENV; cd $R_CODE && $R_VENV/bin/pip install -q -e \".[tpu]\""
}

start_training() {
  local env="" e
  if ((${#ENVS[@]})); then
    for e in "${ENVS[@]}"; do env+="${e%%=*}=$(q "${e#*=}") "; done
  fi
  local train_args
  train_args=$(qall "--config=$CONFIG" "--workdir=$WORKDIR" ${PASS[@]+"${PASS[@]}"})
  ssh_all "cd $R_CODE && if [ -f $R_PID ] && kill -0 \"\$(cat $R_PID)\" 2>/dev/null; then echo \"$PROG: error: a run is still going on \$(hostname); stop it with launch/tpu_pod.sh --name=$NAME --zone=$ZONE --stop\" >&2; exit 1; fi; ${env}nohup $R_VENV/bin/python launch/train.py $train_args > $R_LOG 2>&1 < /dev/null & echo \$! > $R_PID"
}

stream_log() {
  run "${TPU[@]}" ssh "$NAME" "${ZF[@]}" --worker=0 "--command=tail -n +1 -F --pid=\"\$(cat $R_PID)\" $R_LOG"
}

stop_training() {
  ssh_all "if [ -f $R_PID ]; then kill -TERM \"\$(cat $R_PID)\" 2>/dev/null || true; fi"
}

delete_pod() {
  if ((QUEUED)); then
    run "${QR[@]}" delete "$NAME" "${ZF[@]}" --force --quiet
  else
    run "${TPU[@]}" delete "$NAME" "${ZF[@]}" --quiet
  fi
}

if ((!DRY_RUN)) && ! command -v gcloud >/dev/null 2>&1; then
  fail "gcloud is not on PATH; install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install), or add --dry_run"
fi
if ((DRY_RUN)); then echo "# dry run: $PROG would run these commands"; fi

case $ACTION in
  delete) delete_pod ;;
  stop) stop_training ;;
  logs) stream_log ;;
  train)
    ensure_pod
    if ((!SKIP_INSTALL)); then install_code; fi
    start_training
    if ((!NO_STREAM)); then
      stream_log
      if ((DELETE_AFTER)); then delete_pod; fi
    fi ;;
esac
