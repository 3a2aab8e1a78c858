#!/bin/bash
# install-deps.sh: installs, with apt, the system packages the tests need
# and that are missing: qemu-utils (qemu-img, qemu-io: the reference the
# tests compare against), fuse3 (fusermount3, for mount tests), make,
# gcc with libc headers (go test -race needs cgo) and ca-certificates (go
# downloads modules over HTTPS). apt-get update runs only
# when something is missing, so a prepared machine makes no network calls.
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have qemu-img && have qemu-io || need+=(qemu-utils)
have fusermount3 || need+=(fuse3)
# The FUSE tests loop-mount an ext4 guest filesystem through `disk`.
have mkfs.ext4 || need+=(e2fsprogs)
have losetup || need+=(mount)
# Fixtures of the read-only formats: bzip2 chunks for dmg, a cloop image
# made by the reference tool.
have bzip2 || need+=(bzip2)
have create_compressed_fs || need+=(cloop-utils)
have make || need+=(make)
have gcc || need+=(gcc)
[ -e /usr/include/stdlib.h ] || need+=(libc6-dev)
[ -e /etc/ssl/certs/ca-certificates.crt ] || need+=(ca-certificates)

if ((${#need[@]} == 0)); then
	exit 0
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then
	sudo=(sudo)
fi
echo "install-deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q
"${sudo[@]}" apt-get install -y -q --no-install-recommends "${need[@]}"
