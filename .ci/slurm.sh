#!/usr/bin/env bash
# A real single-node SLURM for the tests (tests/test_slurm.py): installs slurm-wlm and munge
# from Debian when missing, writes a minimal slurm.conf (this host, 2 CPUs, partition
# "normal"), and starts munged, slurmctld and slurmd by hand (no systemd).  Idempotent: running
# it again leaves running daemons alone.  Needs root (apt, /etc).
set -euo pipefail

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

CONF=/etc/slurm/slurm.conf
MARK="# qsmflow CI single-node cluster"
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge \
    /var/lib/munge /var/log/munge /etc/munge
if [ -f "$CONF" ] && ! grep -q "$MARK" "$CONF"; then
    echo ".ci/slurm.sh: $CONF exists and is not ours; leaving it (and the daemons) alone" >&2
else
    CPUS=2
    MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    cat > "$CONF" <<CONF_EOF
$MARK (written by .ci/slurm.sh)
ClusterName=qsmflowci
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerParameters=defer_batch=0
MinJobAge=30
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=normal Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF_EOF
fi

# munge: a key, then the daemon (as root: --force skips its ownership checks)
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chmod 0400 /etc/munge/munge.key
if ! munge -n >/dev/null 2>&1; then
    munged --force
fi
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd -N localhost

for _ in $(seq 1 60); do
    if sinfo -h -o "%T" 2>/dev/null | grep -qE "^idle|^mixed|^alloc"; then
        echo ".ci/slurm.sh: SLURM up ($(sinfo -h -o '%P %D %c %T' | head -1))"
        exit 0
    fi
    sleep 0.5
done
echo ".ci/slurm.sh: SLURM did not come up; see /var/log/slurm/*.log" >&2
sinfo >&2 || true
exit 1
