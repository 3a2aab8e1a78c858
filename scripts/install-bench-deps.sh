#!/bin/bash
# install-bench-deps.sh CACHEDIR: installs, with apt, the system packages
# that `make bench` (tests/bench) needs and that are missing, and extracts
# qemu-storage-daemon, the FUSE-export peer, into CACHEDIR without
# installing it system-wide. Prints the path of qemu-storage-daemon on
# its last line.
#
# qemu-storage-daemon ships in qemu-system-common, whose installation
# would pull in the whole emulator stack; the binary itself needs only
# libraries that qemu-utils and fuse3 already bring, so unpacking that
# one package (dpkg -x) is enough to run it. apt-get update runs only
# when something is missing, so a prepared machine makes no network calls.
set -euo pipefail

if (($# != 1)); then
	echo "usage: $0 CACHEDIR" >&2
	exit 2
fi
cache=$1

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have qemu-img && have qemu-io || need+=(qemu-utils)
have fusermount3 || need+=(fuse3)
have fio || need+=(fio)
have mkfs.ext4 || need+=(e2fsprogs)
have losetup || need+=(mount)
# /usr/bin/time is not needed: the bench reads the children's rusage.

sudo=()
if [ "$(id -u)" -ne 0 ]; then
	sudo=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
updated=
update() {
	if [ -z "$updated" ]; then
		"${sudo[@]}" apt-get update -q >&2
		updated=1
	fi
}

if ((${#need[@]} > 0)); then
	echo "install-bench-deps: installing ${need[*]}" >&2
	update
	"${sudo[@]}" apt-get install -y -q --no-install-recommends "${need[@]}" >&2
fi

# The extracted daemon must match the installed qemu-utils, whose version
# the cache directory's name records.
version=$(dpkg-query -W -f '${Version}' qemu-utils)
dir="$cache/qemu-system-common_${version//[:+~]/_}"
qsd="$dir/root/usr/bin/qemu-storage-daemon"
if [ ! -x "$qsd" ]; then
	echo "install-bench-deps: extracting qemu-system-common $version into $dir" >&2
	rm -rf "$dir"
	mkdir -p "$dir"
	# The package list may lack this version until apt-get update ran.
	# Sandbox::User: the download goes straight into the cache directory,
	# which apt's unprivileged _apt user may not be able to write.
	download() { (cd "$dir" && apt-get -o APT::Sandbox::User=root download -q "qemu-system-common=$version" >&2); }
	download || { update && download; }
	dpkg -x "$dir"/qemu-system-common_*.deb "$dir/root"
	rm -f "$dir"/qemu-system-common_*.deb
fi
# A missing shared library shows here rather than as a failed scenario.
if ldd "$qsd" | grep -q 'not found'; then
	ldd "$qsd" | grep 'not found' >&2
	echo "install-bench-deps: $qsd lacks the libraries above" >&2
	exit 1
fi
echo "$qsd"
