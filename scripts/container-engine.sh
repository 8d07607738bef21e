#!/bin/bash
# A Docker-Engine-API-compatible container engine (rootful podman) for the container tests and for
# running stages in container mode on machines without Docker. Adapted from the team's reference
# recipe (../shared/tools/container-engine.sh):
#   - idempotent: a running engine and an existing base image are reused, so tests can call it freely;
#   - the base image localhost/base:bookworm comes from debootstrap (no registry is needed), and
#     images/Dockerfile builds FROM it with BASE_IMAGE=localhost/base:bookworm;
#   - prints the DOCKER_HOST to use as its last line.
# Needs root and apt. GPU device requests are ignored by podman. Stop the service and its health checks with:
#   kill "$(cat "${STATE:-/run/splsm-podman}/service.pid")" "$(cat "${STATE:-/run/splsm-podman}/health.pid")"
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
# The service's socket is root on this host: its folder is root's own, made here with mode 0700 under /run
# (which only root may write), never a fixed name in /tmp that another local user could create first.
STATE=${STATE:-/run/splsm-podman}
SOCK=${SOCK:-$STATE/podman.sock}
BASE=${BASE:-debootstrap}          # debootstrap (~30 s, 200 MB) | busybox (~1 s, 2 MB, no apt inside)
BASE_TAG=${BASE_TAG:-localhost/base:bookworm}

ping() { curl -sf --unix-socket "$SOCK" http://d/_ping >/dev/null 2>&1; }

[ "$(id -u)" = 0 ] || { echo "container-engine.sh: needs root (rootful podman)" >&2; exit 2; }

# Made by us (mkdir fails on anything already there), or refused unless it is a real directory that root
# owns and nobody else may write: a folder someone else made first would let them replace the socket.
if mkdir -m 0700 "$STATE" 2>/dev/null; then
  :
elif [ -L "$STATE" ] || [ ! -d "$STATE" ]; then
  echo "container-engine.sh: $STATE exists and is not a directory (a link?); refusing it" >&2; exit 3
else
  read -r owner mode < <(stat -c '%u %a' "$STATE")
  if [ "$owner" != 0 ] || [ $((8#$mode & 8#022)) -ne 0 ]; then
    echo "container-engine.sh: $STATE belongs to uid $owner with mode $mode; it must be root's, not group- or" \
         "world-writable: refusing it (remove it, or set STATE to a folder of root's own)" >&2
    exit 3
  fi
fi

if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v curl >/dev/null \
    || { [ "$BASE" = debootstrap ] && ! command -v debootstrap >/dev/null; }; then
  apt-get update -q
  # with recommends: podman's network plugins (containernetworking-plugins) come that way
  apt-get install -y -q podman runc debootstrap busybox-static curl containernetworking-plugins >/dev/null
fi

# crun 1.8 rejects this hybrid cgroup v1/v2 host: use runc. Without CAP_SYS_RESOURCE podman's
# default rlimits (nofile/nproc 1048576+) fail, so pin them at or below the hard limits conmon gets.
NOFILE=$(ulimit -Hn); NPROC=$(ulimit -Hu)
if [ "$NPROC" = unlimited ] || [ "$NPROC" -gt 32768 ]; then NPROC=32768; fi
if [ "$NOFILE" = unlimited ] || [ "$NOFILE" -gt 1048576 ]; then NOFILE=1048576; fi
mkdir -p /etc/containers
cat > /etc/containers/containers.conf <<CONF
[containers]
default_ulimits = ["nofile=$NOFILE:$NOFILE", "nproc=$NPROC:$NPROC"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
# short names (postgres:16) resolve to docker.io without asking
[ -f /etc/containers/registries.conf.d/splsm.conf ] || {
  mkdir -p /etc/containers/registries.conf.d
  printf 'unqualified-search-registries = ["docker.io"]\nshort-name-mode = "permissive"\n' \
    > /etc/containers/registries.conf.d/splsm.conf
}

if ! podman image exists "$BASE_TAG"; then
  if [ "$BASE" = debootstrap ]; then
    # the Debian mirror this machine's apt already uses
    MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [ -n "$MIRROR" ] || MIRROR=$(awk '$1=="deb"{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    [ -n "$MIRROR" ] || { echo "no Debian mirror found in apt sources" >&2; exit 1; }
    ROOTFS=$(mktemp -d)
    debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR" >"$STATE/debootstrap.log"
    # apt inside the image uses the same mirror, so image builds need no other network than this one
    echo "deb $MIRROR bookworm main" > "$ROOTFS/etc/apt/sources.list"
    tar -C "$ROOTFS" -c . | podman import -q \
      -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - "$BASE_TAG" >/dev/null
    rm -rf "$ROOTFS"
  else
    d=$(mktemp -d); mkdir -p "$d/bin" "$d/tmp"; cp /bin/busybox "$d/bin/"
    for a in $("$d/bin/busybox" --list); do [ "$a" = busybox ] || ln -sf busybox "$d/bin/$a"; done
    tar -C "$d" -c . | podman import -q -c 'ENV PATH=/bin' - "$BASE_TAG" >/dev/null; rm -rf "$d"
  fi
  podman run --rm "$BASE_TAG" true
fi

if ! ping; then
  rm -f "$SOCK"
  # Started from / : the service outlives this shell, and a working directory that is later deleted
  # (a test checkout) makes every container start fail with "write child: broken pipe".
  (cd / && exec nohup podman system service --time=0 "unix://$SOCK" >"$STATE/service.log" 2>&1) &
  echo $! >"$STATE/service.pid"
  i=0; until ping; do i=$((i+1)); [ $i -lt 100 ] || { cat "$STATE/service.log" >&2; exit 1; }; sleep 0.2; done
fi
# Root's group may use the socket: a compose worker running as a non-root user in group 0 (DOCKER_GID=0)
# starts stage containers through it. The folder above stays root's alone, so no host user reaches it.
chmod 0660 "$SOCK"
# Podman runs health checks from systemd timers; without systemd (a container, a CI machine) none ever
# runs and every `depends_on: condition: service_healthy` waits forever. This loop runs them instead.
if ! { [ -f "$STATE/health.pid" ] && kill -0 "$(cat "$STATE/health.pid")" 2>/dev/null; }; then
  (cd / && exec nohup bash -c 'while sleep "${HEALTH_INTERVAL_S:-3}"; do
      for c in $(podman ps -q --filter health=starting --filter health=healthy --filter health=unhealthy); do
        podman healthcheck run "$c" >/dev/null 2>&1 || true
      done
    done' >/dev/null 2>&1) &
  echo $! >"$STATE/health.pid"
fi
echo "DOCKER_HOST=unix://$SOCK"
