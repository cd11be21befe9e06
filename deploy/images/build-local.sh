#!/usr/bin/env bash
# Build every image the container tests use, from what this machine reaches (Debian's packages, PyPI,
# the Maven jars of deploy/local/): no image registry needed. Run from anywhere; needs an engine
# (deploy/images/engine.sh start) and, for the base, root and debootstrap.
#
#   deploy/images/build-local.sh [base|cpu-base|worker-cpu|kafka|s3|worker ...]
#                     (default: base cpu-base worker-cpu kafka s3, in that order: what the container tests use;
#                      `worker`, the GPU image, is built when named: make images-gpu)
#
# Images (tags overridable by environment):
#   CLS_BASE_IMAGE        cls-base:bookworm   debootstrap --variant=minbase bookworm, imported (built once;
#                                             FORCE_BASE=1 rebuilds it, which invalidates every layer above)
#   CLS_CPU_BASE_IMAGE    cls-base:trixie     the same for Debian trixie (its python3-torch is the CPU build)
#   CLS_WORKER_CPU_IMAGE  cls-workers:cpu     deploy/docker/Dockerfile with TORCH=cpu, BASE_IMAGE=cls-base:trixie
#                                             (the container tests' and testkit.containers' default worker image)
#   CLS_WORKER_IMAGE      cls-workers:local   deploy/docker/Dockerfile with BASE_IMAGE=cls-base:bookworm (GPU torch)
#   CLS_KAFKA_IMAGE   cls-kafka:local      the Kafka jars of deploy/local/lib + Debian's JRE 17
#   CLS_S3_IMAGE      cls-s3:local         moto's S3 API server (version from constraints.txt)
#
# pip downloads go through a BuildKit cache mount (a rebuild after a code change reuses the wheels);
# the machine's CA bundle reaches pip as a build secret (PIP_CERT), never as a layer.
#   PIP_CA_BUNDLE     CA bundle handed to pip (default /etc/ssl/certs/ca-certificates.crt when present)
#   DEBIAN_MIRROR     debootstrap's mirror (default http://deb.debian.org/debian)
#   DOCKER            the docker CLI (default: Debian's /usr/bin/docker when present: it has BuildKit)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
BASE="${CLS_BASE_IMAGE:-cls-base:bookworm}"
CPU_BASE="${CLS_CPU_BASE_IMAGE:-cls-base:trixie}"
WORKER="${CLS_WORKER_IMAGE:-cls-workers:local}"
WORKER_CPU="${CLS_WORKER_CPU_IMAGE:-cls-workers:cpu}"
KAFKA="${CLS_KAFKA_IMAGE:-cls-kafka:local}"
S3="${CLS_S3_IMAGE:-cls-s3:local}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
CA="${PIP_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
if [[ -z "${DOCKER:-}" ]]; then
  if [[ -x /usr/bin/docker ]]; then DOCKER=/usr/bin/docker; else DOCKER=docker; fi
fi
export DOCKER_BUILDKIT=1 BUILDKIT_PROGRESS="${BUILDKIT_PROGRESS:-plain}"

die() { echo "build-local.sh: $*" >&2; exit 1; }
say() { echo "build-local.sh: $*" >&2; }
exists() { "$DOCKER" image inspect "$1" >/dev/null 2>&1; }
secret_args() { if [[ -f "$CA" ]]; then echo "--secret id=pip_cert,src=$CA"; fi; }
timed() {  # timed WHAT CMD...: run, then print how long it took
  local what="$1" start=$SECONDS; shift
  "$@"
  say "$what: $((SECONDS - start)) s"
}

build_base() {  # build_base TAG SUITE
  local tag="$1" suite="$2"
  if exists "$tag" && [[ "${FORCE_BASE:-0}" != 1 ]]; then say "$tag exists (FORCE_BASE=1 rebuilds it)"; return 0; fi
  [[ "$(id -u)" == 0 ]] || die "debootstrap needs root"
  if ! command -v debootstrap >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >&2 || die "apt-get install debootstrap failed"
  fi
  local root; root="$(mktemp -d /var/tmp/cls-base.XXXXXX)"
  debootstrap --variant=minbase "$suite" "$root" "$MIRROR" >"$root.log" 2>&1 \
    || { tail -n 30 "$root.log" >&2; rm -rf "$root"; die "debootstrap $suite failed (log $root.log)"; }
  rm -f "$root.log"
  # No package lists or caches in the layer; apt in Dockerfiles runs `apt-get update` itself.
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
  tar -C "$root" --numeric-owner -c . | "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' \
    --message "debootstrap --variant=minbase $suite" - "$tag" >/dev/null
  rm -rf "$root"
}

build_worker() {
  exists "$BASE" || die "$BASE missing: build-local.sh base"
  # shellcheck disable=SC2046
  "$DOCKER" build -f "$REPO/deploy/docker/Dockerfile" --build-arg BASE_IMAGE="$BASE" $(secret_args) \
    -t "$WORKER" "$REPO"
}

# The CPU image, then a smoke check in it: both workers import, torch without CUDA, a timm and an open_clip forward pass.
build_worker_cpu() {
  exists "$CPU_BASE" || die "$CPU_BASE missing: build-local.sh cpu-base"
  # shellcheck disable=SC2046
  "$DOCKER" build -f "$REPO/deploy/docker/Dockerfile" --build-arg TORCH=cpu --build-arg BASE_IMAGE="$CPU_BASE" \
    $(secret_args) -t "$WORKER_CPU" "$REPO"
  "$DOCKER" run --rm --entrypoint python "$WORKER_CPU" -c "$SMOKE" >&2 || die "$WORKER_CPU: the smoke check failed"
}
SMOKE='
import torch, timm, open_clip
from PIL import Image
from ml.backbones import load_zero_shot_model
import consumers.annotation_worker, consumers.training_worker, ml.fewshot, ml.audit, ml.duplicates  # every dependency
assert not torch.cuda.is_available() and not torch.backends.cuda.is_built()
out = timm.create_model("resnet18", pretrained=False, num_classes=4).eval()(torch.rand(2, 3, 64, 64))
clip = load_zero_shot_model("clip", "cls-tiny-clip", "random", device="cpu", seed=0)
vectors = clip.embed_images([Image.new("RGB", (64, 48), "red")])
print("smoke: torch", torch.__version__, "timm", timm.__version__, tuple(out.shape),
      "open_clip", open_clip.__version__, tuple(vectors.shape))
'

# The Kafka and S3 contexts are tarred with -h: deploy/local/lib may be a symlink (a worktree's).
build_kafka() {
  exists "$BASE" || die "$BASE missing: build-local.sh base"
  [[ -f "$REPO/deploy/local/lib/.complete" ]] || "$REPO/deploy/local/kafka.sh" jars
  tar -ch -C "$REPO/deploy/local" --exclude=.complete lib broker-log4j.properties tools-log4j.properties \
      -C "$HERE/kafka" Dockerfile entrypoint.sh kafka-tool.sh \
    | "$DOCKER" build --build-arg BASE_IMAGE="$BASE" -t "$KAFKA" -
}

build_s3() {
  exists "$BASE" || die "$BASE missing: build-local.sh base"
  # shellcheck disable=SC2046
  tar -ch -C "$REPO" constraints.txt -C "$HERE/s3" Dockerfile \
    | "$DOCKER" build --build-arg BASE_IMAGE="$BASE" $(secret_args) -t "$S3" -
}

"$DOCKER" info >/dev/null 2>&1 || die "no Docker engine answers (deploy/images/engine.sh start)"
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(base cpu-base worker-cpu kafka s3)
total=$SECONDS
for target in "${targets[@]}"; do
  case "$target" in
    base) timed "base $BASE" build_base "$BASE" bookworm ;;
    cpu-base) timed "cpu-base $CPU_BASE" build_base "$CPU_BASE" trixie ;;
    worker) timed "worker $WORKER" build_worker ;;
    worker-cpu) timed "worker-cpu $WORKER_CPU" build_worker_cpu ;;
    kafka) timed "kafka $KAFKA" build_kafka ;;
    s3) timed "s3 $S3" build_s3 ;;
    *) die "unknown image: $target (base|cpu-base|worker-cpu|kafka|s3|worker)" ;;
  esac
done
say "done in $((SECONDS - total)) s"
# A dependency change leaves the superseded worker layers (~7 GB GPU, ~2 GB CPU) behind: keep the disk bounded. Tagged
# images stay; the build cache keeps its most recently used CLS_BUILD_CACHE_KEEP (the wheelhouse among it).
"$DOCKER" image prune -f >/dev/null 2>&1 || true
"$DOCKER" builder prune -f --keep-storage "${CLS_BUILD_CACHE_KEEP:-20GB}" >/dev/null 2>&1 || true
"$DOCKER" image ls --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' | grep -E "^(${BASE%%:*}|${CPU_BASE%%:*}|${WORKER%%:*}|${WORKER_CPU%%:*}|${KAFKA%%:*}|${S3%%:*}):" >&2 || true
