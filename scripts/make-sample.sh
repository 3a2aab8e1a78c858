#!/bin/bash
# make-sample.sh DIR: (re)creates the sample images of testdata/sample in
# DIR with the real qemu-img and qemu-io (Debian qemu-utils 7.2). The
# output is deterministic: tests/sample_test.go runs this script and
# requires the committed images to be byte-identical to its output.
set -euo pipefail
dir=${1:?usage: make-sample.sh DIR}
mkdir -p "$dir"
cd "$dir"
rm -f base.qcow2 disk.qcow2 compressed.qcow2

# base.qcow2: 4 MiB, 4 KiB clusters, three runs of data.
qemu-img create -q -f qcow2 -o cluster_size=4k base.qcow2 4M
qemu-io -f qcow2 \
	-c 'write -P 0x11 0 16k' \
	-c 'write -P 0x22 1M 8k' \
	-c 'write -P 0x33 3M 4k' \
	base.qcow2 >/dev/null

# disk.qcow2: overlay on base.qcow2 (relative name, so the pair works from
# any checkout) that overwrites, zeroes and discards parts of it.
qemu-img create -q -f qcow2 -o cluster_size=4k -b base.qcow2 -F qcow2 disk.qcow2
qemu-io -f qcow2 \
	-c 'write -P 0x44 8k 16k' \
	-c 'write -z 1M 4k' \
	-c 'discard 3M 4k' \
	-c 'write -P 0x55 2M 6k' \
	disk.qcow2 >/dev/null

# compressed.qcow2: 2 MiB, 4 KiB clusters, zstd-compressed clusters next
# to an uncompressed one. One compressed cluster per write: qemu
# compresses the clusters of one request in parallel threads, which would
# make their order in the file vary from run to run.
qemu-img create -q -f qcow2 -o cluster_size=4k,compression_type=zstd compressed.qcow2 2M
qemu-io -f qcow2 \
	-c 'write -c -P 0x66 0 4k' \
	-c 'write -c -P 0x66 4k 4k' \
	-c 'write -c -P 0x66 8k 4k' \
	-c 'write -c -P 0x66 12k 4k' \
	-c 'write -c -P 0x77 512k 4k' \
	-c 'write -P 0x88 1M 4k' \
	compressed.qcow2 >/dev/null
