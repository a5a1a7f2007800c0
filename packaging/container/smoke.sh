#!/usr/bin/env bash
# The container for real: build packaging/container/Dockerfile with podman and run
# the seed's container cycle with llmux-sim models (no GPU, no registry needed).
#
# Usage (root, from anywhere): packaging/container/smoke.sh        (.ci/run runs it)
#
#   1. podman, runc and debootstrap from the machine's apt sources, if missing;
#      podman's settings in a private containers.conf (CONTAINERS_CONF): runc,
#      cgroupfs, ulimits within this machine's hard limits, no init;
#   2. the base image localhost/llmux-smoke-base:bookworm, if missing: Debian
#      bookworm with python3 and pip by `debootstrap --variant=minbase` from the
#      mirror in this machine's apt configuration (install-criu.sh
#      --print-mirrors), imported with `podman import` (no registry is reachable);
#   3. the image, `podman build --format docker` (Docker's format keeps
#      HEALTHCHECK); apt and pip inside the build see this machine's apt
#      validity settings and CA bundle through `-v` mounts into RUN steps only;
#   4. container 1, the seed's flags (--privileged --pid=host --ipc=host -v
#      CHECKPOINTS, --init=false): HEALTHCHECK, io_uring rule in force, the
#      five-step level-4 cycle twice; SIGTERM to llmuxd -> the active model is
#      checkpointed to the volume (shutdown = "checkpoint"), exit status 0, no
#      process left;
#   5. container 2 replaces it on the same volume: the model is restored, its
#      memory intact; `podman stop` -> exit status 0, no process left;
#   6. container 3 without --pid=host: llmuxd is PID 1 and reaps orphans; stop -> 0.
#
# The last line is one summary with timings; the exit status is non-zero on any
# failure. Every wait is bounded. Containers and images of earlier runs (label
# llmux-smoke) are removed first; the base image is kept and reused.
# Environment: LLMUX_SMOKE_WORK (default /var/tmp/llmux-smoke), LLMUX_SMOKE_REBUILD_BASE=1.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${LLMUX_SMOKE_WORK:-/var/tmp/llmux-smoke}
BASE=localhost/llmux-smoke-base:bookworm
IMAGE=localhost/llmux-smoke:latest
LABEL=llmux-smoke
TOKEN=smoke$$            # in every model name: how processes of this run are found on the host
CYCLES=2
START=$SECONDS
TIMES=()

log() { printf 'smoke: %s\n' "$*" >&2; }
fail() {
    log "FAILED: $*"
    printf 'smoke: FAILED after %d s (%s): %s\n' "$((SECONDS - START))" "${TIMES[*]:-}" "$*"
    exit 1
}
lap() { TIMES+=("$1 $(($SECONDS - LAP))s"); LAP=$SECONDS; }
LAP=$SECONDS
[[ $EUID -eq 0 ]] || fail "needs root (rootful podman, --privileged, CRIU)"

# --- 1. tools ------------------------------------------------------------------------------
missing=()
for tool in podman runc debootstrap; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]} with apt"
    timeout 300 apt-get update -qq || fail "apt-get update"
    DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq podman runc debootstrap \
        >"$WORK.apt.log" 2>&1 || { tail -n 20 "$WORK.apt.log" >&2; fail "apt-get install podman runc debootstrap"; }
fi
mkdir -p "$WORK"
# crun refuses cgroup v1 hybrid hosts; podman's default ulimits exceed what a
# container host without CAP_SYS_RESOURCE may set; systemd need not be init here.
nofile=$(ulimit -Hn)
[[ $nofile == unlimited ]] && nofile=1048576
nproc=$(ulimit -Hu)
[[ $nproc == unlimited || $nproc -gt 32768 ]] && nproc=32768
cat >"$WORK/containers.conf" <<EOF
# written by packaging/container/smoke.sh
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
init = false
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_CONF=$WORK/containers.conf
pm() { timeout "${PM_TIMEOUT:-120}" podman "$@"; }

# Leftovers of earlier runs: containers first (they hold the images).
for c in $(pm ps -a -q --filter "label=$LABEL"); do pm rm -f -t 0 "$c" >/dev/null || true; done
lap tools

# --- 2. the base image ---------------------------------------------------------------------
if [[ ${LLMUX_SMOKE_REBUILD_BASE:-0} == 1 ]] || ! pm image exists "$BASE"; then
    line=$(bash "$REPO/packaging/install-criu.sh" --print-mirrors | head -n 1) \
        || fail "no Debian mirror in this machine's apt configuration"
    mirror=${line%%$'\t'*}
    keyring=${line#*$'\t'}
    log "building $BASE with debootstrap from $mirror"
    root=$WORK/rootfs
    rm -rf "$root"
    opts=(--variant=minbase --include=python3,python3-pip)
    [[ -n $keyring && -r $keyring ]] && opts+=("--keyring=$keyring")
    timeout 600 debootstrap "${opts[@]}" bookworm "$root" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -n 20 "$WORK/debootstrap.log" >&2; fail "debootstrap"; }
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb
    tar -C "$root" -c . | PM_TIMEOUT=300 pm import --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null \
        || fail "podman import of the base"
    rm -rf "$root"
    lap base
fi

# --- 3. the image --------------------------------------------------------------------------
# apt and pip inside RUN steps: this machine's Acquire::Check-Valid-Until /
# Check-Date settings (mirror snapshots may carry expired Release files) and its CA
# bundle (a TLS proxy may sign for the index), at paths of their own.
mkdir -p "$WORK/build"
apt-config dump | grep -E '^Acquire::(Check-Valid-Until|Check-Date) ' >"$WORK/build/apt.conf" || true
ca=""
for f in "${SSL_CERT_FILE:-}" /etc/ssl/certs/ca-certificates.crt; do
    [[ -n $f && -s $f ]] && { ca=$f; break; }
done
mounts=(-v "$WORK/build/apt.conf:/etc/apt/apt.conf.d/99llmux-smoke:ro")
if [[ -n $ca ]]; then
    cp "$ca" "$WORK/build/ca.crt"
    printf '[global]\ncert = /etc/llmux-smoke-ca.crt\n' >"$WORK/build/pip.conf"
    index=$(python3 -m pip config get global.index-url 2>/dev/null || true)
    [[ -n $index && $index != file:* ]] && printf 'index-url = %s\n' "$index" >>"$WORK/build/pip.conf"
    mounts+=(-v "$WORK/build/ca.crt:/etc/llmux-smoke-ca.crt:ro" -v "$WORK/build/pip.conf:/etc/pip.conf:ro")
fi
log "building $IMAGE"
old=$(pm image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
PM_TIMEOUT=900 pm build --format docker --pull=never --label "$LABEL=1" "${mounts[@]}" \
    --build-arg "BASE=$BASE" --build-arg "CRIU_BUILDER=$BASE" \
    -f "$REPO/packaging/container/Dockerfile" -t "$IMAGE" "$REPO" >"$WORK/build.log" 2>&1 \
    || { tail -n 30 "$WORK/build.log" >&2; fail "podman build (log: $WORK/build.log)"; }
# the image this run replaced (its layers stay: the next build's cache)
new=$(pm image inspect -f '{{.Id}}' "$IMAGE")
[[ -z $old || $old == "$new" ]] || pm rmi "$old" >/dev/null 2>&1 || true
[[ $(pm image inspect -f '{{.Config.StopSignal}}' "$IMAGE") == SIGTERM ]] || fail "STOPSIGNAL is not SIGTERM"
lap build

# --- the catalog: llmux-sim models, the front for /health ----------------------------------
catalog() { # catalog DIR SHUTDOWN
    mkdir -p "$1"
    cat >"$1/llmux.toml" <<EOF
# written by packaging/container/smoke.sh
[daemon]
socket = "/run/llmux/llmux.sock"
state_dir = "/var/lib/llmux"
vllm_command = ["llmux-sim"]
stop_timeout = "10s"
startup_timeout = "1m"
shutdown = "$2"

[daemon.front]
listen = "127.0.0.1:18000"

[daemon.checkpoint]
criu_path = "/opt/llmux-criu/bin/criu"
cuda_plugin_dir = "/opt/llmux-criu/lib/criu"
images_dir = "/var/lib/llmux/checkpoints"

[models.a]
model = "$TOKEN/a"
port = 18101
sleep_level = 4

[models.b]
model = "$TOKEN/b"
port = 18102
sleep_level = 1
EOF
}
RUN=$WORK/run
rm -rf "$RUN"
mkdir -p "$RUN/state" "$RUN/state3"
catalog "$RUN/etc" checkpoint
catalog "$RUN/etc3" stop
PROBE=(-v "$REPO/packaging/container/smoke_probe.py:/usr/local/lib/smoke_probe.py:ro")

start() { # start NAME ETC STATE [FLAGS...]: podman run -d with the seed's flags
    local name=$1 etc=$2 state=$3
    shift 3
    # --health-interval=disable: no timer (podman wants systemd for it, which need
    # not be init here); `podman healthcheck run` below runs the image's HEALTHCHECK.
    pm run -d --name "$name" --label "$LABEL=1" --pull=never --init=false --privileged \
        --ipc=host --network=none --stop-timeout 60 --health-interval=disable "$@" \
        -v "$state:/var/lib/llmux" -v "$etc:/etc/llmux:ro" "${PROBE[@]}" "$IMAGE" \
        >/dev/null 2>>"$WORK/podman.log" || { tail -n 5 "$WORK/podman.log" >&2; fail "podman run $name"; }
}
probe() { # probe CONTAINER STEP ARGS...: one check inside the container
    local c=$1
    shift
    pm exec "$c" python3 /usr/local/lib/smoke_probe.py "$@" >&2 || {
        pm logs --tail 30 "$c" >&2 || true
        fail "$1 in $c"
    }
}
stopped_cleanly() { # stopped_cleanly CONTAINER stop|term: llmuxd exits 0, nothing left
    local c=$1 rc left
    if [[ $2 == stop ]]; then
        PM_TIMEOUT=90 pm stop -t 60 "$c" >/dev/null 2>>"$WORK/podman.log" || fail "podman stop $c"
    else
        # `podman stop` of a container in the host's PID namespace sends the stop
        # signal to every process of the container (podman 4.3: runc kill --all), so
        # the models die before llmuxd can checkpoint them; `podman kill` signals the
        # main process only, as `docker stop` and Kubernetes do.
        pm kill -s TERM "$c" >/dev/null || fail "podman kill -s TERM $c"
        PM_TIMEOUT=90 pm wait "$c" >/dev/null || fail "podman wait $c"
    fi
    rc=$(pm inspect -f '{{.State.ExitCode}}' "$c")
    [[ $rc == 0 ]] || { pm logs --tail 30 "$c" >&2; fail "llmuxd in $c exited with status $rc"; }
    left=$(grep -l -a -E "${TOKEN}[/]" /proc/[0-9]*/cmdline 2>/dev/null || true)
    [[ -z $left ]] || fail "processes left after podman stop $c: $left"
}
healthy() { # healthy CONTAINER: the image's HEALTHCHECK passes
    local c=$1 i
    for i in $(seq 1 50); do
        pm healthcheck run "$c" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    fail "HEALTHCHECK of $c never passed"
}
leftovers() { # containers of this run; what its models leave in the host's /dev/shm (--ipc=host)
    local c m sem pid
    for c in $(podman ps -a -q --filter "label=$LABEL" 2>/dev/null); do
        timeout 60 podman rm -f -t 0 "$c" >/dev/null 2>>"$WORK/podman.log" || true
    done
    # the link_remap stash of a checkpoint that is never restored, and the named
    # semaphores (loky's, as vLLM's) of llmux-sim processes that are gone
    for m in "$RUN"/state*/checkpoints/*/manifest.json; do
        [[ -r $m ]] || continue
        python3 -c 'import json, shutil, sys
d = (json.load(open(sys.argv[1])).get("link_remap_stash") or {}).get("dir", "")
if d.startswith("/dev/shm/llmux-remap-"): shutil.rmtree(d, ignore_errors=True)' "$m" || true
    done
    for sem in /dev/shm/sem.loky-*; do
        pid=${sem#/dev/shm/sem.loky-}
        pid=${pid%%-*}
        [[ $pid =~ ^[0-9]+$ && ! -e /proc/$pid ]] && rm -f "$sem"
    done
    return 0
}
trap leftovers EXIT

# --- 4. container 1: the seed's flags --------------------------------------------------------
start llmux-smoke-1 "$RUN/etc" "$RUN/state" --pid=host
probe llmux-smoke-1 ready
healthy llmux-smoke-1
probe llmux-smoke-1 cycle a b "$CYCLES"
probe llmux-smoke-1 seccomp a
lap "level4 cycle"
stopped_cleanly llmux-smoke-1 term
[[ -s $RUN/state/checkpoints/a/manifest.json ]] || fail "no checkpoint of a on the volume after podman stop"
lap stop

# --- 5. container 2 replaces it: the checkpoint is restored from the volume ----------------
pm rm llmux-smoke-1 >/dev/null 2>>"$WORK/podman.log" || fail "podman rm llmux-smoke-1"
start llmux-smoke-2 "$RUN/etc" "$RUN/state" --pid=host
probe llmux-smoke-2 ready
probe llmux-smoke-2 resumed a "$((CYCLES + 1))"
# `podman stop` under --pid=host signals the models too (see stopped_cleanly), so
# the checkpoint asked for is usually defeated: the exit status must say which.
PM_TIMEOUT=90 pm stop -t 60 llmux-smoke-2 >/dev/null 2>>"$WORK/podman.log" || fail "podman stop llmux-smoke-2"
rc=$(pm inspect -f '{{.State.ExitCode}}' llmux-smoke-2)
said=$(pm logs llmux-smoke-2 2>&1 | grep -c "could not reach sleep level 4" || true)
case $rc/$said in
    1/[1-9]*) log "podman stop under --pid=host: the checkpoint became a stop, exit 1, said so" ;;
    0/0) # exit 0: a is on the volume, or podman's TERM reached it before llmuxd's
         # shutdown began (then nothing was active to checkpoint, and the log says so)
        if [[ -s $RUN/state/checkpoints/a/manifest.json ]]; then
            log "podman stop under --pid=host: a checkpointed anyway, exit 0"
        elif pm logs llmux-smoke-2 2>&1 | grep -q "a: pid [0-9]* .* unexpectedly"; then
            log "podman stop under --pid=host: a was killed before llmuxd's shutdown, exit 0, logged"
        else
            pm logs --tail 30 llmux-smoke-2 >&2
            fail "llmux-smoke-2: exit 0 without a checkpoint"
        fi ;;
    *) pm logs --tail 30 llmux-smoke-2 >&2; fail "llmux-smoke-2: exit status $rc does not match the outcome" ;;
esac
left=$(grep -l -a -E "${TOKEN}[/]" /proc/[0-9]*/cmdline 2>/dev/null || true)
[[ -z $left ]] || fail "processes left after podman stop llmux-smoke-2: $left"
lap "new container"

# --- 6. container 3: its own PID namespace, llmuxd is PID 1 ----------------------------------
start llmux-smoke-3 "$RUN/etc3" "$RUN/state3"
probe llmux-smoke-3 ready
probe llmux-smoke-3 pid1 b 50
stopped_cleanly llmux-smoke-3 stop
lap pid1

printf 'smoke: ok in %d s (%s): image built, level-4 cycle x%d with state kept, podman stop -> 0 with nothing left (1, said, where it defeated the checkpoint), checkpoint restored by a new container, PID 1 reaps\n' \
    "$((SECONDS - START))" "$(IFS=,; echo "${TIMES[*]}" | sed 's/,/, /g')" "$CYCLES"
