#!/usr/bin/env bash
# TPU pod: copy the project to every worker, install it with the tpu extra, run the same training
# command on all workers (jax.distributed.initialize() auto-detects the TPU pod); a restarted run loads
# its compiled step from the workers' compilation cache.
#   launch/tpu_pod.sh TPU_NAME ZONE -- --config configs/wan.py:wan2.1-t2v-14b,mesh=fsdp --workdir gs://bucket/run
set -euo pipefail
tpu=$1; zone=$2; shift 2
[ "${1:-}" = "--" ] && shift
args=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm scp --recurse --worker=all --zone "$zone" . "$tpu":~/hallojax
gcloud compute tpus tpu-vm ssh "$tpu" --worker=all --zone "$zone" --command "
  set -e; cd ~/hallojax
  [ -x .venv/bin/python ] || { python3 -m venv .venv && .venv/bin/pip install -q -c constraints.txt -e '.[tpu]'; }
  JAX_COMPILATION_CACHE_DIR=\${JAX_COMPILATION_CACHE_DIR:-\$HOME/.cache/hallojax-jax} .venv/bin/hallojax train $args"
