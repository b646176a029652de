#!/usr/bin/env bash
# A real 2-node Slurm cluster on this one host, for tests and for trying the Slurm launcher.
#
#   slurm/local-cluster.sh start    install (Debian, as root, when missing), configure, start, wait for idle nodes
#   slurm/local-cluster.sh status   sinfo + squeue
#   slurm/local-cluster.sh stop     stop the daemons started here
#
# Two slurmd daemons (-N n1, -N n2) on ports 17001/17002 of this host, one slurmctld, munge.
# ProctrackType=proctrack/linuxproc and TaskPlugin=task/none (no cgroups needed),
# SelectType=select/cons_tres with CR_CPU. n1 and n2 resolve to 127.0.0.1 through /etc/hosts.
# Exit codes: 0 ok, 3 cannot run here (not root / no apt-get / daemons fail to start).
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
STATE=/var/spool/slurm-local
LOGS=/var/log/slurm-local
RUN=/run/slurm-local
HOST=$(hostname)
CPUS=${LOCAL_CLUSTER_CPUS:-2}
MARK="# pretrain local-cluster"

die() { echo "local-cluster: $*" >&2; exit 3; }

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "Slurm is not installed (${missing[*]}) and installing needs root"
    command -v apt-get >/dev/null || die "Slurm is not installed (${missing[*]}) and there is no apt-get"
    echo "local-cluster: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || die "apt-get update failed"
    apt-get install -y -qq "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
}

write_config() {
    mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/d" "$LOGS" "$RUN"
    if ! grep -q "^127.0.0.1[[:space:]].*\bn1\b" /etc/hosts 2>/dev/null; then
        echo "127.0.0.1 n1 n2 $MARK" >> /etc/hosts
    fi
    getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST $MARK" >> /etc/hosts
    cat > "$CONF" <<EOF
$MARK (written by slurm/local-cluster.sh)
ClusterName=local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
ReturnToService=2
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldPort=6817
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
KillWait=20
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=n1 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17001 CPUs=$CPUS RealMemory=1000 State=UNKNOWN
NodeName=n2 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17002 CPUs=$CPUS RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
    install_packages
    [ "$(id -u)" -eq 0 ] || die "starting the local cluster needs root"
    write_config
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    if ! pgrep -x munged >/dev/null; then
        [ -f /etc/munge/munge.key ] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null; chmod 400 /etc/munge/munge.key; }
        chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
        if id munge >/dev/null 2>&1; then
            su -s /bin/sh munge -c "munged" || munged --force || die "munged does not start"
        else
            munged --force || die "munged does not start"
        fi
    fi
    running "$RUN/slurmctld.pid" || slurmctld -f "$CONF" || die "slurmctld does not start (see $LOGS/slurmctld.log)"
    for node in n1 n2; do
        running "$RUN/slurmd-$node.pid" || slurmd -N "$node" -f "$CONF" || die "slurmd -N $node does not start (see $LOGS/slurmd-$node.log)"
    done
    for _ in $(seq 1 60); do
        if [ "$(sinfo -h -N -o '%N %t' 2>/dev/null | awk '$2=="idle"' | sort -u | wc -l)" -ge 2 ]; then
            sinfo -N
            return 0
        fi
        # nodes left down by an earlier run come back when asked
        scontrol update NodeName=n1,n2 State=RESUME >/dev/null 2>&1 || true
        sleep 1
    done
    sinfo -N >&2 || true
    die "the nodes did not become idle within 60 s (see $LOGS/)"
}

stop() {
    # Jobs first: stopping the daemons under a running job leaves its srun and ranks alive,
    # training into directories that may be gone. Cancel them and wait for their steps to end.
    if running "$RUN/slurmctld.pid" && [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
        squeue -h -o %i | xargs -r scancel
        for _ in $(seq 1 60); do
            [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
            sleep 1
        done
        [ -z "$(squeue -h -o %i 2>/dev/null)" ] || echo "local-cluster: jobs still listed after 60 s: $(squeue -h -o %i | tr '\n' ' ')" >&2
    fi
    # steps whose slurmstepd outlived the cancel (the node daemons go next)
    pkill -TERM -f "slurmstepd: \[" 2>/dev/null || true
    for pidfile in "$RUN"/slurmd-n1.pid "$RUN"/slurmd-n2.pid "$RUN"/slurmctld.pid; do
        if running "$pidfile"; then kill "$(cat "$pidfile")"; fi
    done
    # a daemon whose pid file is gone is found by its command line; wait for all to exit
    pkill -TERM -f "^slurm(ctld|d) .*-f $CONF" 2>/dev/null || true
    for _ in $(seq 1 20); do
        pgrep -f "^slurm(ctld|d) .*-f $CONF" >/dev/null || break
        sleep 0.5
    done
    pkill -KILL -f "^slurm(ctld|d) .*-f $CONF" 2>/dev/null || true
    echo "local-cluster: stopped (munged left running)"
}

status() {
    sinfo -N && squeue
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
