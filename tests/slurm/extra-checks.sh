#!/usr/bin/env bash
# More behaviour checks (appended to tests/fixtures/slurm/<version>/checks.txt): what sacct says
# while a job is COMPLETING, the state timeline of a 2-node job, squeue with one unknown id among
# known ones, and the USR2 -> `scontrol requeue` self-requeue flow. Run like record-fixtures.sh.
set -uo pipefail
VER=$(sinfo --version | grep -oE '[0-9]+\.[0-9]+' | head -n 1)
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=$(realpath -m "${1:-$HERE/../fixtures/slurm/$VER}")
W=/var/tmp/hpcpipe-fixture-extra-$VER
rm -rf "$W" && mkdir -p "$W" "$OUT" && cd "$W" || exit 1
check() { echo "$*" | tee -a "$OUT/checks.txt" >&2; }
state() { squeue -h --states=all -j "$1" -o %T 2>/dev/null | head -n 1; }
sub() { sbatch --parsable "$@" | cut -d';' -f1; }

# 1. COMPLETING: squeue vs sacct while a TERM-ignoring job is being killed.
J=$(sub -o /dev/null --wrap 'trap "" TERM; while :; do sleep 1; done')
until [[ $(state "$J") == RUNNING ]]; do sleep 0.2; done
scancel "$J"
sleep 2
check "while COMPLETING after scancel: squeue=$(state "$J") sacct=$(sacct -n -P -X -j "$J" -o State,ExitCode,End)"

# 2. State timeline of a 2-node job (every 0.1 s).
J2=$(sub --nodes=2 --ntasks-per-node=2 -o /dev/null --wrap 'srun sleep 2')
prev= tl=
for ((i = 0; i < 200; i++)); do
    s=$(state "$J2")
    [[ $s != "$prev" ]] && tl+="$(date +%T.%N | cut -c1-12) $s; "
    prev=$s
    [[ $s == COMPLETED || $s == FAILED ]] && break
    sleep 0.1
done
check "2-node job timeline: $tl"

# 3. squeue/sacct with a known and an unknown id.
squeue -h --states=all -j "$J2,99999999" -o '%i|%T' >"$W/sq" 2>&1
check "squeue -j KNOWN,99999999: rc=$? out=$(tr '\n' ';' <"$W/sq")"
scontrol show job -o 99999999 >"$W/sc" 2>&1
check "scontrol show job -o 99999999: rc=$? out=$(tr '\n' ';' <"$W/sc")"

# 4. Self-requeue on USR2 (the preemption/time-limit pattern), restarted at once.
cat >"$W/selfreq.sh" <<'EOF'
#!/bin/bash
echo "start restart=${SLURM_RESTART_COUNT:-0} $(date +%s)"
trap 'echo "USR2 at $(date +%s), requeueing"; scontrol requeue $SLURM_JOB_ID; exit 0' USR2
if [ "${SLURM_RESTART_COUNT:-0}" -ge 1 ]; then echo done; exit 0; fi
for i in $(seq 100); do sleep 1; done
EOF
J3=$(sub --requeue --open-mode=append --time=1 --signal=B:USR2@50 -o "$W/selfreq-%j.out" "$W/selfreq.sh")
for ((i = 0; i < 600; i++)); do
    s=$(squeue -h -j "$J3" -o '%T|%r|%n' 2>/dev/null; scontrol show job -o "$J3" | grep -o 'Restarts=[0-9]*')
    [[ $s == *Restarts=1* && $s == PENDING* ]] && break
    sleep 0.2
done
check "self-requeue after USR2: $(squeue -h -j "$J3" -o '%T|%r') $(scontrol show job -o "$J3" | grep -oE 'Restarts=[0-9]+|StartTime=[^ ]+')"
scontrol update JobId="$J3" StartTime=now
for ((i = 0; i < 300; i++)); do
    [[ $(state "$J3") == COMPLETED ]] && break
    sleep 0.2
done
sleep 2
check "self-requeue final: $(state "$J3"); log: $(tr '\n' ';' <"$W"/selfreq-*.out); sacct: $(sacct -n -P -D -X -j "$J3" -o State,ExitCode,Reason | tr '\n' ';')"
