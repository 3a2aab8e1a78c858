# `make test` runs every check (CI runs it through .ci/run); `make demo`
# runs imgfs on the sample images in testdata/sample and mounts them.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

# Go from the official tarball lives in /usr/local/go/bin, which the PATH
# of a fresh machine lacks.
ifeq ($(shell command -v go 2>/dev/null),)
export PATH := /usr/local/go/bin:$(PATH)
endif

# FUZZTIME is how long `make fuzz` runs each fuzz target.
FUZZTIME ?= 5s
SAMPLE := testdata/sample
DEMO := bin/demo

.PHONY: test deps fmt vet unit fuzz build demo clean bench
# The checks of `test` run in order even under make -j.
.NOTPARALLEL:

# Unit tests run last so that the output ends with go test's summary.
# Fuzz targets run their seed corpora there; `make fuzz` explores further
# (a time-boxed search would make CI's verdict a matter of luck).
test: deps fmt vet unit

# System packages: qemu-utils (the reference), fuse3, gcc for -race.
deps:
	@scripts/install-deps.sh

fmt:
	@files=$$(gofmt -l .); \
	if [ -n "$$files" ]; then echo "gofmt needed on:"; echo "$$files"; exit 1; fi

vet:
	go vet ./...

# -count=1: the integration tests run a freshly built binary, which go
# test's cache does not know about.
unit:
	go test -race -count=1 -timeout 25m ./...

fuzz:
	scripts/fuzz.sh $(FUZZTIME)

build:
	go build -o bin/imgfs ./cmd/imgfs

demo: build
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	bin/imgfs info --backing-chain $(SAMPLE)/disk.qcow2
	bin/imgfs info --output=json $(SAMPLE)/compressed.qcow2
	bin/imgfs check $(SAMPLE)/disk.qcow2
	bin/imgfs map $(SAMPLE)/disk.qcow2
	bin/imgfs map --output=json $(SAMPLE)/compressed.qcow2
	bin/imgfs convert -c -O qcow2 $(SAMPLE)/disk.qcow2 $(DEMO)/disk-compressed.qcow2
	bin/imgfs check $(DEMO)/disk-compressed.qcow2
	bin/imgfs compare $(SAMPLE)/disk.qcow2 $(DEMO)/disk-compressed.qcow2
	scripts/demo-mount.sh bin/imgfs $(SAMPLE) $(DEMO)

# imgfs beside qemu-img and qemu-storage-daemon on a 4 GiB workload, as
# root; BENCHFLAGS passes flags (e.g. BENCHFLAGS='-size 512M -runs 1'),
# which tests/bench's doc comment describes.
bench:
	go run ./tests/bench $(BENCHFLAGS)

clean:
	rm -rf bin
