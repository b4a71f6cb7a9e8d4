#!/usr/bin/env bash
# Train on a TPU slice of a GKE cluster through XPK (https://github.com/AI-Hypercomputer/xpk),
# with the same config and flags as on a laptop.
#
#   launch/xpk.sh --cluster=CLUSTER --workload=NAME --tpu_type=v5litepod-16 \
#       --config=configs/mae.py[:preset] --workdir=DIR [options] [-- train.py flags ...]
#
# Runs `xpk workload create`: XPK builds the image (the fmjax image of launch/gke/Dockerfile,
# with this checkout copied on top into /app) and submits a JobSet that runs launch/train.py on
# every host of the slice; GKE sets TPU_WORKER_HOSTNAMES, from which launch/train.py calls
# jax.distributed.initialize(). `launch/xpk.sh --help` lists the options; --dry_run prints
# every command ("+ ...", one per line) and runs none.
set -euo pipefail

PROG=xpk.sh
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<'EOF'
Usage: launch/xpk.sh --cluster=CLUSTER --workload=NAME --tpu_type=TYPE
           --config=configs/<method>.py[:preset] --workdir=DIR [options] [-- train.py flags ...]
       launch/xpk.sh --cluster=CLUSTER --workload=NAME --delete

Submit launch/train.py as an XPK workload on a TPU slice of a GKE cluster (one made by
`xpk cluster create`). Everything after -- is passed to train.py verbatim.

Required:
  --cluster=CLUSTER        the GKE cluster
  --workload=NAME          the workload (JobSet) name: lowercase letters, digits and -
  --tpu_type=TYPE          e.g. v5litepod-16, v6e-16, v5p-32, v4-32 (not needed by --delete)
  --config=CONFIG          e.g. configs/mae.py:vit_b16_imagenet (a path inside this checkout)
  --workdir=DIR            storage every host reaches, e.g. a gs:// bucket path

Options:
  --num_slices=N           slices (default 1)
  --docker_image=IMAGE     the image to run (default fmjax-tpu, built by --build). A local
                           image gets this checkout copied on top (xpk --script-dir); an image
                           in a registry (gcr.io/..., *-docker.pkg.dev/...) runs as it is
  --build                  first build the fmjax-tpu image from launch/gke/Dockerfile
  --project=PROJECT        the GCP project (default: gcloud's core/project)
  --zone=ZONE              the cluster's zone
  --max_restarts=N         JobSet restarts after a failure or preemption (each resumes)
  --dry_run                print the commands (one per line, prefixed "+ ") and run nothing
  -h, --help               this help
  --delete                 delete the workload instead

Example:
  launch/xpk.sh --cluster=my-cluster --workload=fmjax-mae --tpu_type=v5litepod-16 --build \
      --config=configs/mae.py:vit_b16_imagenet --workdir=gs://BUCKET/fmjax/mae -- --config.total_steps=1000
EOF
}

die() {  # a usage problem: one line naming it and the fix, exit 2
  echo "$PROG: error: $*" >&2
  exit 2
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

qall() {
  local first=1 a
  for a in "$@"; do
    if ((first)); then first=0; else printf ' '; fi
    q "$a"
  done
}

run() {  # print the command ("+ ..."); run it unless --dry_run
  if ((DRY_RUN)); then
    echo "+ $(qall "$@")"
  else
    echo "+ $(qall "$@")" >&2
    "$@"
  fi
}

CLUSTER="" WORKLOAD="" TPU_TYPE="" CONFIG="" WORKDIR="" PROJECT="" ZONE="" MAX_RESTARTS=""
NUM_SLICES=1 IMAGE=fmjax-tpu BUILD=0 DRY_RUN=0 DELETE=0
PASS=()

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
    --cluster | --workload | --tpu_type | --config | --workdir | --project | --zone | --num_slices | \
      --docker_image | --max_restarts)
      if ((!has_val)); then
        if (($# == 0)) || [[ $1 == --* ]]; then die "$key needs a value, e.g. $key=VALUE"; fi
        val=$1
        shift
      fi
      [[ -n $val ]] || die "$key is empty; give it a value, e.g. $key=VALUE"
      case $key in
        --cluster) CLUSTER=$val ;;
        --workload) WORKLOAD=$val ;;
        --tpu_type) TPU_TYPE=$val ;;
        --config) CONFIG=$val ;;
        --workdir) WORKDIR=$val ;;
        --project) PROJECT=$val ;;
        --zone) ZONE=$val ;;
        --num_slices) NUM_SLICES=$val ;;
        --docker_image) IMAGE=$val ;;
        --max_restarts) MAX_RESTARTS=$val ;;
      esac ;;
    --build | --dry_run | --delete | -h | --help)
      ((!has_val)) || die "$key takes no value; pass $key alone"
      case $key in
        --build) BUILD=1 ;;
        --dry_run) DRY_RUN=1 ;;
        --delete) DELETE=1 ;;
        -h | --help) usage; exit 0 ;;
      esac ;;
    --config.* | --check_only*)
      die "$arg is a train.py flag; put it after --, e.g. launch/xpk.sh ... -- $arg" ;;
    *) die "unknown argument $arg; see launch/xpk.sh --help" ;;
  esac
done

[[ -n $CLUSTER ]] || die "--cluster is missing; pass --cluster=CLUSTER (a GKE cluster made by xpk cluster create)"
[[ -n $WORKLOAD ]] || die "--workload is missing; pass --workload=NAME, e.g. --workload=fmjax-mae"
[[ $WORKLOAD =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--workload=$WORKLOAD is not a valid name; use lowercase letters, digits and -, starting with a letter"
XF=("--cluster=$CLUSTER" "--workload=$WORKLOAD")
if [[ -n $PROJECT ]]; then XF+=("--project=$PROJECT"); fi
if [[ -n $ZONE ]]; then XF+=("--zone=$ZONE"); fi

if ((DELETE)); then
  ((${#PASS[@]} == 0)) || die "--delete takes no train.py flags; drop what follows --"
  if ((DRY_RUN)); then echo "# dry run: $PROG would run these commands"; fi
  run xpk workload delete "${XF[@]}"
  exit 0
fi

[[ -n $TPU_TYPE ]] || die "--tpu_type is missing; pass e.g. --tpu_type=v5litepod-16"
[[ $TPU_TYPE =~ ^[a-z0-9]+-[0-9]+$ ]] || die "--tpu_type=$TPU_TYPE is not a TPU type; pass e.g. --tpu_type=v5litepod-16"
[[ $NUM_SLICES =~ ^[1-9][0-9]*$ ]] || die "--num_slices=$NUM_SLICES is not a positive integer; pass e.g. --num_slices=1"
[[ -z $MAX_RESTARTS || $MAX_RESTARTS =~ ^[0-9]+$ ]] || die "--max_restarts=$MAX_RESTARTS is not a number; pass e.g. --max_restarts=3"
[[ -n $CONFIG ]] || die "--config is missing; pass --config=configs/<method>.py[:preset], e.g. --config=configs/mae.py"
[[ -f $REPO/${CONFIG%%:*} ]] || die "--config=$CONFIG: no file ${CONFIG%%:*} in $REPO; pass a path inside the checkout, e.g. --config=configs/mae.py"
[[ -n $WORKDIR ]] || die "--workdir is missing; pass --workdir=DIR, storage every host reaches (e.g. gs://BUCKET/fmjax/mae)"
case $WORKDIR in
  /* | *://*) ;;
  *) die "--workdir=$WORKDIR is relative: it would land inside each container and vanish with it; pass an absolute or gs:// path every host reaches" ;;
esac

# An image in a registry runs as it is (xpk refuses --script-dir with it); a local one gets
# this checkout copied on top into /app.
case $IMAGE in
  gcr.io/* | *docker.pkg.dev/*) SCRIPT_DIR=() ;;
  *) SCRIPT_DIR=("--script-dir=$REPO") ;;
esac
if ((BUILD)); then
  case $IMAGE in
    gcr.io/* | *docker.pkg.dev/*) die "--build makes a local image; drop --build or pass a local --docker_image name" ;;
  esac
fi

train=$(qall python launch/train.py "--config=$CONFIG" "--workdir=$WORKDIR" ${PASS[@]+"${PASS[@]}"})
create=(xpk workload create "${XF[@]}" "--tpu-type=$TPU_TYPE" "--num-slices=$NUM_SLICES"
  "--docker-image=$IMAGE" ${SCRIPT_DIR[@]+"${SCRIPT_DIR[@]}"})
if [[ -n $MAX_RESTARTS ]]; then create+=("--max-restarts=$MAX_RESTARTS"); fi
create+=("--command=$train")

if ((DRY_RUN)); then
  echo "# dry run: $PROG would run these commands"
else
  command -v xpk >/dev/null 2>&1 || die "xpk is not on PATH; pip install xpk (https://github.com/AI-Hypercomputer/xpk), or add --dry_run"
fi
if ((BUILD)); then run docker build -f "$REPO/launch/gke/Dockerfile" -t "$IMAGE" "$REPO"; fi
run "${create[@]}"
