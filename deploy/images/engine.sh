#!/usr/bin/env bash
# A Docker engine on this machine: Debian's docker.io, dockerd started in the background.
#
#   deploy/images/engine.sh start    install docker.io and Compose v2 (root, apt) when missing, start dockerd,
#                                    wait until it answers
#   deploy/images/engine.sh status   exit 0 when an engine answers `docker info`
#   deploy/images/engine.sh stop     stop the dockerd this script started
#
# Nothing is pulled from a registry here (none is reachable): images are built by build-local.sh.
# Environment:
#   ENGINE_LOG         dockerd's log (default /var/log/cls-dockerd.log)
#   ENGINE_DATA_ROOT   dockerd's --data-root (default /var/lib/docker: the build cache lives there)
#   ENGINE_STORAGE     storage driver to try first (default overlay2; vfs is the fallback)
set -euo pipefail

LOG="${ENGINE_LOG:-/var/log/cls-dockerd.log}"
DATA_ROOT="${ENGINE_DATA_ROOT:-/var/lib/docker}"
PIDFILE=/run/cls-dockerd.pid

die() { echo "engine.sh: $*" >&2; exit 1; }

docker_cli() {
  # Debian's CLI matches Debian's engine and carries BuildKit; another `docker` on PATH may lack buildx.
  if [[ -x /usr/bin/docker ]]; then echo /usr/bin/docker; else command -v docker || true; fi
}

answers() {
  local cli; cli="$(docker_cli)"
  [[ -n "$cli" ]] && timeout 20 "$cli" info >/dev/null 2>&1
}

install_engine() {
  [[ -x /usr/sbin/dockerd || -x /usr/bin/dockerd ]] && return 0
  [[ "$(id -u)" == 0 ]] || die "dockerd is not installed and this is not root: apt-get install docker.io"
  echo "engine.sh: installing Debian's docker.io (once)..." >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends docker.io iptables ca-certificates >&2
}

# Compose v2: bookworm ships only docker-compose 1.29 (no `name:`, no `!reset`); Debian trixie's
# docker-compose package is Compose 2.26, a Go binary that needs only libc6 >= 2.34. It is fetched with
# apt from a trixie list kept apart from the system's sources (nothing else comes from trixie).
install_compose() {
  local cli; cli="$(docker_cli)"
  [[ -n "$cli" ]] && "$cli" compose version >/dev/null 2>&1 && return 0
  [[ "$(id -u)" == 0 ]] || { echo "engine.sh: no Compose v2 (docker compose); the compose test will fail" >&2; return 0; }
  echo "engine.sh: installing Compose v2 (Debian trixie's docker-compose package, once)..." >&2
  local dir; dir="$(mktemp -d /var/tmp/cls-compose.XXXXXX)"
  mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" \
    >"$dir/sources.list"
  local apt_opts=(-o "Dir::Etc::SourceList=$dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
                  -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/cache")
  apt-get "${apt_opts[@]}" update -qq >&2
  (cd "$dir" && apt-get "${apt_opts[@]}" download docker-compose >&2 2>/dev/null) || die "apt-get download docker-compose failed"
  dpkg -i "$dir"/docker-compose_*.deb >&2
  rm -rf "$dir"
  "$cli" compose version >&2
}

start_with() {  # start_with DRIVER: 0 when the engine answers within 60 s
  local driver="$1"
  mkdir -p "$(dirname "$LOG")"
  echo "--- $(date -u +%FT%TZ) dockerd --storage-driver $driver" >>"$LOG"
  setsid nohup dockerd --data-root "$DATA_ROOT" --storage-driver "$driver" --pidfile "$PIDFILE" \
    >>"$LOG" 2>&1 </dev/null &
  local pid=$! deadline=$((SECONDS + 60))
  while ((SECONDS < deadline)); do
    if answers; then return 0; fi
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.5
  done
  kill "$pid" 2>/dev/null || true
  return 1
}

cmd_start() {
  if answers; then install_compose; echo "engine.sh: an engine answers"; return 0; fi
  install_engine
  install_compose
  [[ "$(id -u)" == 0 ]] || die "starting dockerd needs root"
  local first="${ENGINE_STORAGE:-overlay2}" driver
  for driver in "$first" vfs; do
    if start_with "$driver"; then
      echo "engine.sh: dockerd up (storage $driver, log $LOG)"
      return 0
    fi
    echo "engine.sh: dockerd with $driver did not come up; see $LOG" >&2
    sleep 1
  done
  tail -n 30 "$LOG" >&2
  die "no engine"
}

cmd_stop() {
  [[ -f "$PIDFILE" ]] || { echo "engine.sh: not started here"; return 0; }
  local pid; pid="$(cat "$PIDFILE")"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || { echo "engine.sh: stopped"; return 0; }; sleep 0.5; done
  die "dockerd $pid still running after 30 s"
}

case "${1:-}" in
  start) cmd_start ;;
  status) if answers; then echo "engine.sh: an engine answers"; else echo "engine.sh: no engine answers"; exit 1; fi ;;
  stop) cmd_stop ;;
  *) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
