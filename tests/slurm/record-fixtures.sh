#!/usr/bin/env bash
# Records real Slurm outputs (the ones hpcpipe parses) and behaviour checks from a running testbed
# cluster into tests/fixtures/slurm/<major.minor>/. Each fixture's first line is "# <command>".
#
#   export SLURM_CONF=/var/tmp/hpcpipe-slurm/slurm.conf            # 22.05 (Debian)
#   bash tests/slurm/record-fixtures.sh
#   eval "$(HPCPIPE_SLURM_VERSION=25.11 bash tests/slurm/testbed.sh env)"   # 25.11
#   bash tests/slurm/record-fixtures.sh
#
# Takes about 3 minutes (a job is left to hit its 1-minute time limit). Cancels only its own jobs.
set -uo pipefail

VER=$(sinfo --version | grep -oE '[0-9]+\.[0-9]+' | head -n 1)
[[ -n $VER ]] || { echo "record-fixtures: sinfo --version failed (SLURM_CONF=${SLURM_CONF:-unset})" >&2; exit 1; }
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=$(realpath -m "${1:-$HERE/../fixtures/slurm/$VER}")
W=/var/tmp/hpcpipe-fixture-jobs-$VER
rm -rf "$W" && mkdir -p "$W" "$OUT"
chmod 755 "$W"
cd "$W" || exit 1
CHECKS=$OUT/checks.txt
echo "# behaviour checks by tests/slurm/record-fixtures.sh (and extra-checks.sh): what a job saw" >"$CHECKS"

SQ="squeue -h --states=all -O 'JobID:|,State:|,Reason:|,TimeUsed:|,TimeLimit:|,NodeList:|,Restartcnt:|,SubmitTime:|,StartTime:|,Dependency:|'"
SA="sacct -n -P -D -o JobID,State,ExitCode,Elapsed,Timelimit,NodeList,Submit,Start,End,Reason,AllocCPUS,TotalCPU,MaxRSS,ReqMem"

log() { echo "record-fixtures[$VER]: $*" >&2; }
check() { echo "$*" | tee -a "$CHECKS" >&2; }

# rec NAME 'command line': writes OUT/NAME.txt = "# command", stdout, then stderr lines and the
# exit status as "# stderr: ..." / "# rc=N" comment lines.
rec() {
    local name=$1 cmd=$2 rc
    {
        echo "# $cmd"
        eval "$cmd" 2>"$W/.err"
        rc=$?
        sed 's/^/# stderr: /' "$W/.err"
        echo "# rc=$rc"
    } >"$OUT/$name.txt"
}

state() { squeue -h --states=all -j "$1" -o %T 2>/dev/null | head -n 1; }
wait_state() {  # wait_state JOB SECONDS STATE_REGEX
    local j=$1 secs=$2 re=$3 i s
    for ((i = 0; i < secs * 5; i++)); do
        s=$(state "$j")
        [[ $s =~ ^($re)$ ]] && return 0
        sleep 0.2
    done
    log "job $j not in state ($re) after ${secs}s (is: $s)"
    return 1
}
sub() { sbatch --parsable "$@" | cut -d';' -f1; }
MINE=()

# ---- static outputs
rec sinfo_version "sinfo --version"
rec sinfo_nodes "sinfo -h -N -o '%N|%P|%c|%m|%G|%T'"
rec scontrol_show_config "scontrol show config"
rec sbatch_test_only_gpus_per_node "sbatch --test-only --gpus-per-node=1 --wrap hostname 2>&1"
rec sbatch_test_only_gres "sbatch --test-only --gres=gpu:1 --wrap hostname 2>&1"
rec sbatch_test_only_gpus_per_node_too_many "sbatch --test-only --gpus-per-node=3 --wrap hostname 2>&1"

# ---- jobs
J_OK=$(sub -J ok --time=5 -o "$W/ok-%j.out" --wrap 'echo hello; sleep 3')
J_FAIL=$(sub -J fail --time=5 -o "$W/fail-%j.out" --wrap 'echo bad; sleep 8; exit 3')
J_RUN=$(sub -J run --time=10 -o "$W/run-%j.out" --wrap 'sleep 600')
J_PEND=$(sub -J pend --begin=now+3600 -o "$W/pend-%j.out" --wrap true)
J_DEPKILL=$(sub -J depkill --dependency=afterok:$J_FAIL --kill-on-invalid-dep=yes -o "$W/depkill-%j.out" --wrap true)
J_DEPNEVER=$(sub -J depnever --dependency=afterok:$J_FAIL --kill-on-invalid-dep=no -o "$W/depnever-%j.out" --wrap true)
J_DEPOK=$(sub -J depok --dependency=afterok:$J_OK --kill-on-invalid-dep=yes -o "$W/depok-%j.out" --wrap 'echo dep ran')
J_2N=$(sub -J twonode --nodes=2 --ntasks-per-node=2 -o "$W/twonode-%j.out" --wrap 'srun hostname; srun printenv SLURMD_NODENAME')
J_CPT=$(sub -J cpt -n 1 --cpus-per-task=4 -o "$W/cpt-%j.out" --wrap 'echo batch SLURM_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK-unset} SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK-unset}; srun bash -c "echo step SLURM_CPUS_PER_TASK=\${SLURM_CPUS_PER_TASK-unset} SLURM_CPUS_ON_NODE=\$SLURM_CPUS_ON_NODE"')
J_GRES=$(sub -J gres --gres=gpu:1 -o "$W/gres-%j.out" --wrap 'echo batch CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset} SLURM_GPUS_ON_NODE=${SLURM_GPUS_ON_NODE-unset}; srun bash -c "echo step CUDA_VISIBLE_DEVICES=\${CUDA_VISIBLE_DEVICES-unset}"')
J_GPN=$(sub -J gpn --nodes=2 --ntasks-per-node=1 --gpus-per-node=2 -o "$W/gpn-%j.out" --wrap 'echo batch CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset} SLURM_GPUS_PER_NODE=${SLURM_GPUS_PER_NODE-unset}; srun bash -c "echo step \$SLURMD_NODENAME CUDA_VISIBLE_DEVICES=\${CUDA_VISIBLE_DEVICES-unset}"')
J_OUTDIR=$(sub -J outdir -o "$W/newdir/sub/%j.out" --wrap 'echo written')
# Requeue: first run sleeps, the restarted run (SLURM_RESTART_COUNT=1) ends at once.
REQ_SCRIPT='echo run restart=${SLURM_RESTART_COUNT:-0}; if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then sleep 120; fi; echo end restart=${SLURM_RESTART_COUNT:-0}'
J_REQ=$(sub -J requeue --requeue --open-mode=append -o "$W/req-append-%j.out" --wrap "$REQ_SCRIPT")
J_REQT=$(sub -J requeue-default --requeue -o "$W/req-default-%j.out" --wrap "$REQ_SCRIPT")
# --signal: B: = batch shell only; without B: = job steps only. Time limit 1 min, signal 45 s before.
J_SIGB=$(sub -J sigb --time=1 --signal=B:USR2@45 -o "$W/sigb-%j.out" --wrap 'echo start $(date +%s); trap "echo USR2 batch at \$(date +%s)" USR2; for i in $(seq 100); do sleep 1; done')
cat >"$W/sigs.sh" <<'EOF'
#!/bin/bash
echo start $(date +%s)
trap 'echo USR2 batch at $(date +%s)' USR2
srun bash -c 'trap "echo USR2 step at \$(date +%s)" USR2; for i in $(seq 100); do sleep 1; done' &
wait; wait
EOF
J_SIGS=$(sub -J sigs --time=1 --signal=USR2@45 -o "$W/sigs-%j.out" "$W/sigs.sh")
J_TERM=$(sub -J ignoreterm -o "$W/ignoreterm-%j.out" --wrap 'trap "" TERM; while :; do sleep 1; done')
MINE=("$J_OK" "$J_FAIL" "$J_RUN" "$J_PEND" "$J_DEPKILL" "$J_DEPNEVER" "$J_DEPOK" "$J_2N" "$J_CPT" "$J_GRES" "$J_GPN" "$J_OUTDIR" "$J_REQ" "$J_REQT" "$J_SIGB" "$J_SIGS" "$J_TERM")
log "jobs: ${MINE[*]}"
trap 'scancel "${MINE[@]}" 2>/dev/null' EXIT

# State timeline of a plain short job (does it pass through COMPLETING?).
(
    echo "# squeue -h --states=all -j $J_OK -o %T, polled every 0.1 s (sbatch --time=5 --wrap 'echo hello; sleep 3')"
    prev=
    for ((i = 0; i < 150; i++)); do
        s=$(state "$J_OK")
        [[ $s != "$prev" ]] && echo "$(date +%T.%N | cut -c1-12) $s"
        prev=$s
        [[ $s == COMPLETED || $s == FAILED ]] && break
        sleep 0.1
    done
) >"$OUT/timeline_short_job.txt" &
TL=$!

wait_state "$J_RUN" 30 RUNNING
wait_state "$J_FAIL" 30 RUNNING
rec squeue_pending_running "$SQ -j $J_RUN,$J_PEND,$J_DEPKILL,$J_DEPNEVER,$J_FAIL"
rec scontrol_show_job_running "scontrol show job -o $J_RUN"

# Requeue while running, then make it eligible at once.
wait_state "$J_REQ" 30 RUNNING
wait_state "$J_REQT" 30 RUNNING
sleep 2
rec scontrol_requeue "scontrol requeue $J_REQ,$J_REQT"
sleep 1
rec squeue_requeued "$SQ -j $J_REQ,$J_REQT"
rec scontrol_show_job_requeued "scontrol show job -o $J_REQ"
sleep 3
rec scontrol_show_job_requeued_later "scontrol show job -o $J_REQ"
scontrol update JobId="$J_REQ" StartTime=now
scontrol update JobId="$J_REQT" StartTime=now
wait_state "$J_REQ" 60 COMPLETED
wait_state "$J_REQT" 60 COMPLETED
rec scontrol_show_job_requeued_completed "scontrol show job -o $J_REQ"

# COMPLETING: a job that ignores SIGTERM stays COMPLETING for KillWait after scancel.
wait_state "$J_TERM" 30 RUNNING
scancel "$J_TERM"
wait_state "$J_TERM" 10 COMPLETING
rec squeue_completing "$SQ -j $J_TERM"
rec scontrol_show_job_completing "scontrol show job -o $J_TERM"

# Dependencies: the failed parent.
wait_state "$J_FAIL" 60 FAILED
sleep 2
rec squeue_dependency_failed "$SQ -j $J_DEPKILL,$J_DEPNEVER,$J_FAIL"
wait "$TL"
wait_state "$J_DEPOK" 60 COMPLETED
wait_state "$J_2N" 60 COMPLETED
wait_state "$J_CPT" 60 'COMPLETED|FAILED'
wait_state "$J_GRES" 60 'COMPLETED|FAILED'
wait_state "$J_GPN" 60 'COMPLETED|FAILED'
wait_state "$J_OUTDIR" 60 'COMPLETED|FAILED|CANCELLED'
rec squeue_completed "$SQ -j $J_OK,$J_FAIL,$J_DEPOK,$J_2N,$J_OUTDIR"

# Cancel a running and a pending job.
scancel "$J_RUN" "$J_PEND"
wait_state "$J_RUN" 30 CANCELLED
wait_state "$J_SIGB" 150 'TIMEOUT|COMPLETED|FAILED|CANCELLED'
wait_state "$J_SIGS" 150 'TIMEOUT|COMPLETED|FAILED|CANCELLED'
rec squeue_cancelled_timeout "$SQ -j $J_RUN,$J_PEND,$J_SIGB,$J_SIGS"
sleep 3  # let slurmdbd catch up

rec sacct_completed_failed "$SA -j $J_OK,$J_FAIL,$J_2N,$J_DEPOK"
rec sacct_cancelled_running_pending "$SA -j $J_RUN,$J_PEND,$J_TERM"
rec sacct_requeued "$SA -j $J_REQ,$J_REQT"
rec sacct_dependency "$SA -j $J_DEPKILL,$J_DEPNEVER"
rec sacct_timeout_signal "$SA -j $J_SIGB,$J_SIGS"
rec sacct_gpu_cpt_outdir "$SA -j $J_CPT,$J_GRES,$J_GPN,$J_OUTDIR"
rec sacct_unknown_job "$SA -j 99999999"
rec squeue_unknown_job "$SQ -j 99999999"
rec scontrol_show_job_unknown "scontrol show job -o 99999999"
rec scontrol_show_job_dependency_never "scontrol show job -o $J_DEPNEVER"
scancel "$J_DEPNEVER"
sleep 2
rec sacct_dependency_never_cancelled "$SA -j $J_DEPNEVER"

# ---- behaviour checks (also kept in checks.txt)
check "version: $(sinfo --version)"
check "2-node job $J_2N: $(state "$J_2N"); output: $(sort "$W"/twonode-*.out | uniq -c | tr -s ' \n' ' ')"
check "short job state timeline: $(grep -v '^#' "$OUT/timeline_short_job.txt" | tr '\n' ';')"
check "cpus-per-task=4 job: $(tr '\n' ';' <"$W"/cpt-*.out); step AllocCPUS: $(sacct -n -P -j "$J_CPT.0" -o AllocCPUS)"
check "--gres=gpu:1: $(tr '\n' ';' <"$W"/gres-*.out)"
check "--gpus-per-node=2 x 2 nodes: $(tr '\n' ';' <"$W"/gpn-*.out)"
if [[ -d $W/newdir/sub ]]; then
    check "--output into a missing folder: folder CREATED; job $(state "$J_OUTDIR"); files: $(ls "$W/newdir/sub")"
else
    check "--output into a missing folder: folder NOT created; job $(state "$J_OUTDIR") ($(sacct -n -P -X -j "$J_OUTDIR" -o State,ExitCode,Reason))"
fi
check "requeue with --open-mode=append, log: $(tr '\n' ';' <"$W"/req-append-*.out)"
check "requeue with default open mode, log: $(tr '\n' ';' <"$W"/req-default-*.out)"
check "--signal=B:USR2@45 --time=1: $(tr '\n' ';' <"$W"/sigb-*.out)"
check "--signal=USR2@45 --time=1 (steps): $(tr '\n' ';' <"$W"/sigs-*.out)"
check "failed parent + --kill-on-invalid-dep=yes: $(sacct -n -P -X -j "$J_DEPKILL" -o State,Reason) / =no: $(sacct -n -P -X -j "$J_DEPNEVER" -o State,Reason)"
log "done: fixtures in $OUT, job outputs in $W"
