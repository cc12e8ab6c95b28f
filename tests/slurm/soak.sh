#!/usr/bin/env bash
# Stability check for a running testbed cluster: a 2-node job at the start, node states every 30 s
# for MINUTES (default 11), a 2-node job at the end, then the controller log is searched for the
# node-loss symptoms seen with a 25.11 build lacking --enable-multiple-slurmd.
#
#   eval "$(HPCPIPE_SLURM_VERSION=25.11 bash tests/slurm/testbed.sh env)"
#   bash tests/slurm/soak.sh [MINUTES]      # exit 0 = stable
set -uo pipefail
MINUTES=${1:-11}
LOG=$(scontrol show config | awk -F' = ' '/^SlurmctldLogFile/ {print $2}')
START_LINE=$(($(wc -l <"$LOG") + 1))
bad=0

two_node_job() {
    local j s i
    j=$(sbatch --parsable --nodes=2 --ntasks-per-node=2 -o /dev/null --wrap 'srun hostname') || return 1
    for ((i = 0; i < 300; i++)); do
        s=$(sacct -n -P -X -j "$j" -o State 2>/dev/null | head -n 1)
        [[ $s == COMPLETED || $s == FAILED || $s == CANCELLED* || $s == TIMEOUT ]] && break
        sleep 0.2
    done
    echo "$(date +%T) 2-node job $j: ${s:-?} ($(sacct -n -P -X -j "$j" -o NodeList,Elapsed))"
    [[ $s == COMPLETED ]]
}

echo "$(date +%T) $(sinfo --version), soak for $MINUTES min, log $LOG"
two_node_job || bad=1
end=$((SECONDS + MINUTES * 60))
while ((SECONDS < end)); do
    # 25.11 suffixes "-" (PLANNED by backfill) to a usable node's state: strip it.
    states=$(sinfo -h -N -o '%N=%T' | sed 's/-$//' | sort -u | tr '\n' ' ')
    echo "$(date +%T) $states"
    # "planned": idle, but reserved by backfill for a pending job (both versions): usable.
    [[ $(grep -oE 'n[12]=(idle|mixed|allocated|completing|planned) ' <<<"$states" | wc -l) == 2 ]] || bad=1
    sleep 30
done
two_node_job || bad=1
hits=$(tail -n +"$START_LINE" "$LOG" | grep -E "Not responding|not responding|_fwd_tree_get_addr|Duplicated NodeHostName|DOWN" || true)
if [[ -n $hits ]]; then
    echo "controller log during the soak:"
    echo "$hits"
    bad=1
fi
echo "$(date +%T) soak result: $([[ $bad == 0 ]] && echo STABLE || echo UNSTABLE)"
exit $bad
