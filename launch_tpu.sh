#!/usr/bin/env bash
# Runs one command on every worker of a TPU VM slice, each from a fresh or updated checkout.
#
#   REPO_URL=https://github.com/OWNER/quietreasoning.git \
#     ./launch_tpu.sh PROJECT TPU_NAME ZONE "python train.py --config configs/3b.yaml run.distributed=true"
#
# Environment:
#   REPO_URL       git URL every worker clones (required)
#   REPO_DIR       checkout directory on the workers, relative to the login home (default: quietreasoning)
#   REPO_REF       branch, tag or commit to check out (default: fast-forward the remote's default branch)
#   WANDB_API_KEY  passed to COMMAND on every worker, never shown (see below)
#
# On each worker, in order: clone REPO_URL into REPO_DIR if it is missing, else fetch; check out
# REPO_REF; `pip install -e .` together with `jax[tpu]` at the jax version that checkout's
# pyproject.toml pins (read there, so the TPU build always matches the version pip installs);
# then COMMAND in the checkout, run by `bash -c`, so it may hold quotes, `&&` and pipes.
#
# The API key never appears on a command line: gcloud records its arguments in its own log files,
# `ps` shows them to every user of both machines, and stdin is shared by the parallel ssh sessions
# of --worker=all. It travels instead in the ssh session's environment, as LC_QR_WANDB_API_KEY:
# ssh forwards it (-o SendEnv), the workers' sshd accepts it (Ubuntu's sshd_config has
# `AcceptEnv LANG LC_*`), and the remote side renames it to WANDB_API_KEY before COMMAND starts.
# If a worker's sshd drops it, that worker stops with an error instead of running without it.
set -euo pipefail

usage="usage: ./launch_tpu.sh PROJECT TPU_NAME ZONE \"COMMAND\" (COMMAND quoted as one argument; env: REPO_URL required, REPO_DIR, REPO_REF, WANDB_API_KEY optional)"

if [[ $# -eq 1 && ( $1 == -h || $1 == --help ) ]]; then
  echo "$usage"
  exit 0
fi
if [[ $# -ne 4 || -z $1 || -z $2 || -z $3 || -z $4 ]]; then
  echo "$usage" >&2
  exit 2
fi
project=$1 tpu_name=$2 zone=$3 command=$4

if [[ -z ${REPO_URL:-} ]]; then
  echo "error: REPO_URL is not set: export REPO_URL=<git URL of this repository> (the URL every worker clones)" >&2
  exit 2
fi
if ! command -v gcloud >/dev/null; then
  echo "error: gcloud is not on PATH: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)" >&2
  exit 2
fi

# $1 in POSIX single quotes (each ' becomes '\''), which any remote login shell reads back verbatim.
quote() {
  local sq="'" esc="'\\''"
  printf "'%s'" "${1//"$sq"/"$esc"}"
}

# Look at the key with tracing off, so even `bash -x launch_tpu.sh` cannot print its value.
{ tracing=${-//[^x]/}; set +x; } 2>/dev/null
send_key=0
if [[ -n ${WANDB_API_KEY:-} ]]; then
  export LC_QR_WANDB_API_KEY="$WANDB_API_KEY"
  send_key=1
fi
if [[ -n $tracing ]]; then set -x; fi
ssh_flags=()
if [[ $send_key = 1 ]]; then
  ssh_flags+=(--ssh-flag=-oSendEnv=LC_QR_WANDB_API_KEY)
fi

# What each worker runs in its login shell: the settings, single-quoted, then the steps below.
# The key is not among them; it arrives as LC_QR_WANDB_API_KEY in the session's environment.
steps=$(cat <<'REMOTE'
if [ "$send_key" = 1 ]; then
  WANDB_API_KEY=${LC_QR_WANDB_API_KEY:-}
  unset LC_QR_WANDB_API_KEY
  if [ -z "$WANDB_API_KEY" ]; then
    echo "error: WANDB_API_KEY did not reach $(uname -n): its sshd must accept LC_* variables (AcceptEnv LANG LC_* in /etc/ssh/sshd_config)" >&2
    exit 2
  fi
  export WANDB_API_KEY
fi
if [ -d "$repo_dir/.git" ]; then
  git -C "$repo_dir" remote set-url origin "$repo_url"
  git -C "$repo_dir" fetch --quiet --tags origin
  git -C "$repo_dir" remote set-head origin --auto >/dev/null
else
  git clone --quiet "$repo_url" "$repo_dir"
fi
cd "$repo_dir"
if [ -n "$repo_ref" ]; then
  # A branch name means the fetched remote branch, not a stale local one.
  if git rev-parse --verify --quiet "origin/$repo_ref^{commit}" >/dev/null; then repo_ref=origin/$repo_ref; fi
  git checkout --quiet --detach "$repo_ref"
else
  default_branch=$(git rev-parse --abbrev-ref origin/HEAD)
  git checkout --quiet "${default_branch#origin/}"
  git pull --quiet --ff-only
fi
jax_version=$(sed -n 's/^[[:space:]]*"jax==\([^"]*\)".*/\1/p' pyproject.toml | head -n 1)
if [ -z "$jax_version" ]; then
  echo "error: $repo_dir/pyproject.toml on $(uname -n) pins no jax version (expected a \"jax==X\" dependency)" >&2
  exit 2
fi
pip install --quiet -e . "jax[tpu]==$jax_version"
REMOTE
)
remote="set -eu
repo_url=$(quote "$REPO_URL")
repo_dir=$(quote "${REPO_DIR:-quietreasoning}")
repo_ref=$(quote "${REPO_REF:-}")
send_key=$send_key
$steps
exec bash -c $(quote "$command")"

echo "launch_tpu.sh: all workers of $tpu_name ($project, $zone): ${REPO_URL}${REPO_REF:+ @ $REPO_REF} -> $command" >&2
if [[ $send_key = 1 ]]; then
  echo "launch_tpu.sh: WANDB_API_KEY goes through the ssh environment (value not shown)" >&2
fi
exec gcloud compute tpus tpu-vm ssh "$tpu_name" --project "$project" --zone "$zone" --worker=all \
  ${ssh_flags[@]+"${ssh_flags[@]}"} --command "$remote"
