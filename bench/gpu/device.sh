#!/usr/bin/env bash
# One step of a GPU session through the device tool (a `run` call each), from the repo root:
#
#   bash bench/gpu/device.sh part N        # copy the carried bundle part .gpu/...part-0N aside
#   bash bench/gpu/device.sh probe         # unpack the bundle, install .whl, then the MPS
#                                          # probe (torch and the project's launcher code)
#   bash bench/gpu/device.sh start ARGS    # unpack the bundle, install .whl, start
#                                          # sharing_run.py ARGS in the background, then wait
#   bash bench/gpu/device.sh trace ARGS    # the same with trace_run.py ARGS
#   bash bench/gpu/device.sh fault         # mps_fault.py (torch + Triton, no vLLM): $OUT/mps-fault.json
#   bash bench/gpu/device.sh wait [S]      # wait up to S seconds (default 540) for the run to
#                                          # finish; returns at once if its process is gone
#   bash bench/gpu/device.sh skip          # ask the run to skip its optional steps
#
# Every call leaves the run's results so far in $OUT/run.tgz and prints the latest lines.
# COHOST_RUN_DIR moves the run's folder (/tmp/cohost-run; the tests use their own).
# The run itself is started with setsid, so it outlives the call while the machine is warm.
set -uo pipefail
RUN=${COHOST_RUN_DIR:-/tmp/cohost-run}
PARTS=/tmp/parts
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PATH="/usr/local/nvidia/bin:$PATH" VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1
export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"

# vLLM from the bundle's parts, the project's wheels (.whl) beside it, once per machine.
install() {
  if [ ! -d /tmp/site/vllm ]; then
    cat "$PARTS"/vllm-site.tar.xz.part-* | tar -xJ -C /tmp || return 1
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || return 1
  python3 -c 'import vllm, structlog, tenacity, openai, httpx2; print("vllm", vllm.__version__)'
}

alive() { [ ! -s "$RUN/pid" ] || kill -0 "$(cat "$RUN/pid")" 2>/dev/null; }

collect() {
  mkdir -p "$RUN"
  tar -C "$RUN" -czf "$OUT/run.tgz" --exclude='*.lock' --exclude='mps-pipe' . 2>/dev/null
  echo "== progress (last lines)"; tail -n 25 "$RUN/progress.log" 2>/dev/null | cut -c1-400
  nvidia-smi --query-gpu=memory.used,memory.total,utilization.gpu --format=csv,noheader 2>/dev/null
}

case "${1:-}" in
  part)
    mkdir -p "$PARTS" && cp ".gpu/vllm-site.tar.xz.part-0$2" "$PARTS/" && ls -l "$PARTS"
    nvidia-smi -L 2>/dev/null; python3 -c 'import torch; print(torch.__version__, torch.cuda.is_available())'
    ;;
  probe)
    install || exit 1
    python3 bench/gpu/mps_probe.py "$OUT/probe.json" 2>&1 | tail -n 60
    ;;
  start|trace)
    script=sharing_run.py; [ "$1" = trace ] && script=trace_run.py
    shift
    install || exit 1
    mkdir -p "$RUN"
    rm -f "$RUN/pid"
    # The run writes its own pid (setsid may fork, so $! need not be it).
    setsid nohup bash -c 'echo $$ > "$1/pid"; shift; exec python3 "$@"' run "$RUN" \
      "bench/gpu/$script" "$RUN" "$@" > "$RUN/progress.log" 2>&1 < /dev/null &
    echo "started: $script $RUN $*"
    bash "$0" wait "${WAIT_S:-480}"
    ;;
  fault)
    # Triton: the host's torch brings it; the bundle's, where it is unpacked, comes first.
    python3 bench/gpu/mps_fault.py "$OUT/mps-fault.json" 2>&1 | tail -n 40
    ;;
  wait)
    # Until the run is done or its process is gone: a run that died at its first line
    # must not hold the machine (and the session's device time) to the deadline.
    deadline=$((SECONDS + ${2:-540}))
    while [ $SECONDS -lt $deadline ] && [ ! -e "$RUN/done" ] && alive; do sleep 5; done
    collect
    if [ -e "$RUN/done" ]; then echo "== run done"
    elif ! alive; then echo "== run ended without finishing (see the progress above)"; exit 1
    fi
    ;;
  skip)
    mkdir -p "$RUN" && touch "$RUN/skip-optional" && echo "optional steps will be skipped"
    collect
    ;;
  *)
    echo "usage: $0 part N | probe | start ARGS | trace ARGS | fault | wait [S] | skip" >&2; exit 2 ;;
esac
