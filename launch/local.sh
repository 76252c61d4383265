#!/usr/bin/env bash
# N training processes on this machine over 127.0.0.1 (gloo collectives), each with D simulated CPU
# devices: how multi-host code is tested without a cluster (tests/test_train.py runs it).
#   launch/local.sh 2 4 -- --config configs/wan.py:demo --workdir runs/mh --config.train.batch_size=8
# Logs: $LOG_DIR/process_<i>.log (default .); XLA_EXTRA_FLAGS are added to each process's XLA_FLAGS.
# Exits non-zero if any process fails.
set -euo pipefail
n=$1; d=$2; shift 2
[ "${1:-}" = "--" ] && shift
port=${HALLOJAX_PORT:-$((20000 + RANDOM % 20000))}
py=${PYTHON:-python}
log_dir=${LOG_DIR:-.}
pids=()
for ((i = 0; i < n; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$d ${XLA_EXTRA_FLAGS:-}" JAX_PLATFORMS=cpu \
  HALLOJAX_COORDINATOR=127.0.0.1:$port HALLOJAX_NUM_PROCESSES=$n HALLOJAX_PROCESS_ID=$i \
    "$py" -m hallojax.cli train "$@" > "$log_dir/process_$i.log" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
