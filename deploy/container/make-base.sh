#!/usr/bin/env bash
# A Debian bookworm base image made here, for hosts that reach no image registry:
# debootstrap (minbase) -> tar -> `docker import`. It stands in for python:3.11-slim-bookworm
# in the Dockerfile's FROM (`--build-arg PYTHON_IMAGE=<this tag>`): Debian's python3 is 3.11,
# python3-venv gives `python -m venv` its pip, python-is-python3 the `python` the Dockerfile
# calls. Trimmed like Debian's own slim images (no docs, man pages or locales; apt lists
# removed).
#
#   deploy/container/make-base.sh [TAG]        # default jobvisor-base:bookworm
#
# Needs root, debootstrap and a reachable Debian mirror (DEBIAN_MIRROR, default
# http://deb.debian.org/debian). Takes about two minutes; the tag is replaced.
set -euo pipefail

tag=${1:-jobvisor-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
suite=bookworm

[[ $(id -u) == 0 ]] || { echo "make-base: needs root (debootstrap)" >&2; exit 2; }
command -v debootstrap >/dev/null || { echo "make-base: no debootstrap (apt-get install debootstrap)" >&2; exit 2; }

root=$(mktemp -d /var/tmp/jobvisor-base.XXXXXX)
cleanup() { rm -rf --one-file-system "$root"; }
trap cleanup EXIT

# The slim trimming goes in before any package is unpacked, so debootstrap's own
# packages are trimmed too (the same dpkg configuration Debian's slim images carry).
mkdir -p "$root/etc/dpkg/dpkg.cfg.d"
cat > "$root/etc/dpkg/dpkg.cfg.d/docker" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
CFG

debootstrap --variant=minbase --merged-usr \
    --include=ca-certificates,python3,python3-venv,python-is-python3 \
    "$suite" "$root" "$mirror" >&2

cat > "$root/etc/apt/sources.list" <<LIST
deb $mirror $suite main
deb $mirror $suite-updates main
deb $security $suite-security main
LIST
# As in Debian's images: apt keeps no .deb files or package caches in the layers.
cat > "$root/etc/apt/apt.conf.d/docker-clean" <<'CFG'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CFG
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/log/*.log \
       "$root"/var/log/apt/* "$root"/tmp/* "$root"/debootstrap
# Docker writes these per container.
: > "$root/etc/resolv.conf"; : > "$root/etc/hostname"
"$root/usr/bin/python3" --version >/dev/null 2>&1 || chroot "$root" python3 --version >&2

old_id=$(docker image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)
tar --numeric-owner --xattrs -C "$root" -c . \
  | docker import \
      -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      -c 'ENV LANG=C.UTF-8' \
      -c 'CMD ["bash"]' \
      -m "debootstrap --variant=minbase $suite + python3 python3-venv python-is-python3" \
      - "$tag" >/dev/null
# The image this tag named before, if nothing else uses it.
if [[ -n $old_id && $old_id != "$(docker image inspect -f '{{.Id}}' "$tag")" ]]; then
  docker rmi "$old_id" >/dev/null 2>&1 || true
fi
docker run --rm "$tag" python -c 'import sys, venv, ensurepip; print("make-base:", sys.version.split()[0])' >&2
echo "$tag"
