#!/usr/bin/env bash
# A container engine and stand-in Flower images on a machine that has neither, for the Compose test.
#
#   sudo bash tests/containers/podman_setup.sh
#
# Installs rootful podman (+ runc, debootstrap, podman-compose), builds a Debian base image with debootstrap and,
# from it, stand-ins for flwr/superlink, flwr/supernode and flwr/superexec:${FLWR_VERSION} (the official images
# cannot be pulled where no registry is reachable). Every step is skipped when its result is already there, so
# it is safe to run again. ../shared/CONTAINERS.md (project notes) has the measurements behind each choice.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
FLWR_VERSION="${FLWR_VERSION:-1.42.0}"
step() { echo "[podman-setup $(date +%T)] $*"; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null; then
  step "installing podman, runc, debootstrap"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q podman runc debootstrap >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q podman runc debootstrap >/dev/null; }
fi

# crun (podman's default runtime) fails on these VMs: it cannot raise RLIMIT_NOFILE and does not run on hybrid
# cgroups. runc with ulimits inside the VM's hard limits works.
conf=/etc/containers/containers.conf
if ! grep -q 'runtime = "runc"' "$conf" 2>/dev/null || ! grep -q "nproc=" "$conf"; then
  step "configuring podman: runc, ulimits"
  mkdir -p /etc/containers
  # The values measured to work (an nproc of this shell's own hard limit, 96363, was refused), within its limits.
  cap() { local hard; hard="$(ulimit "$1")"; [ "$hard" = unlimited ] || [ "$hard" -ge "$2" ] && echo "$2" || echo "$hard"; }
  hard_nofile="$(cap -Hn 20000)"; hard_nproc="$(cap -Hu 32768)"
  cat > "$conf" <<CONF
[containers]
default_ulimits = ["nofile=${hard_nofile}:${hard_nofile}", "nproc=${hard_nproc}:${hard_nproc}"]
[engine]
runtime = "runc"
CONF
fi

if ! podman image exists localhost/debian-base; then
  step "building localhost/debian-base with debootstrap"
  mirror="$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)"
  [ -n "$mirror" ] || mirror="$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list)"
  rootfs="$tmp/rootfs"
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >/dev/null
  tar -C "$rootfs" -c . | podman import -q - localhost/debian-base >/dev/null
fi

# HTTPS leaving these machines may be re-signed by a proxy: the builds trust what the host trusts.
ctx="$tmp/context"
mkdir "$ctx"
cp /etc/ssl/certs/ca-certificates.crt "$ctx/host-ca.crt"
if ! podman image exists "localhost/flwr-standin:$FLWR_VERSION"; then
  step "building localhost/flwr-standin:$FLWR_VERSION (python3, venv, flwr)"
  podman build -q -f "$here/flwr-standin.Containerfile" --build-arg "FLWR_VERSION=$FLWR_VERSION" \
    -t "localhost/flwr-standin:$FLWR_VERSION" "$ctx" >/dev/null
fi
for name in superlink supernode superexec; do
  if ! podman image exists "flwr/$name:$FLWR_VERSION"; then
    step "tagging stand-in flwr/$name:$FLWR_VERSION (entrypoint flower-$name)"
    printf 'FROM localhost/flwr-standin:%s\nENTRYPOINT ["flower-%s"]\n' "$FLWR_VERSION" "$name" \
      | podman build -q -f - -t "flwr/$name:$FLWR_VERSION" "$ctx" >/dev/null
  fi
done

if ! command -v podman-compose >/dev/null; then
  step "installing podman-compose"
  python3 -m pip install --quiet --break-system-packages "podman-compose==1.6.0" 2>/dev/null \
    || python3 -m pip install --quiet "podman-compose==1.6.0"
fi
step "ready: $(podman --version), $(podman-compose --version 2>/dev/null | head -1)"
