# Thin wrapper over CMake; see README.md.
SHELL := /bin/bash
BUILD ?= build
JOBS  ?= $(shell nproc)
DEB_PACKAGES = build-essential cmake pkg-config libluajit2-5.1-dev libuv1-dev lua-luv-dev lua-luv \
  node-llhttp libcurl4-openssl-dev lua-cjson lua-yaml lua-busted lua-argparse lua-check curl wrk nginx-light prometheus \
  clang libclang-rt-14-dev openssl

PREFIX ?= /usr/local
DESTDIR ?=
PYTHON ?= python3

.PHONY: all deps test test-asan demo bench install clean fuzz fuzz-build fuzz-smoke

all: $(BUILD)/sglr

$(BUILD)/Makefile:
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo

$(BUILD)/sglr: $(BUILD)/Makefile FORCE
	cmake --build $(BUILD) -j $(JOBS)

FORCE:

deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing:" $$missing; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	else echo "all build and test packages are installed"; fi

test: deps all test-asan fuzz-smoke
	cd $(BUILD) && ctest --output-on-failure -j 2

# Again under AddressSanitizer + UBSan: the C unit tests, the Lua unit
# specs (they drive the C bindings in-process, FFI calls included), then
# the functional specs with the router and sim workers built with
# sanitizers (the spec runner itself is the normal build). Any sanitizer
# report fails.
ASAN_LOGS = $(CURDIR)/build-asan/logs
test-asan: deps all
	cmake -S . -B build-asan -DSGLR_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug >/dev/null
	cmake --build build-asan -j $(JOBS)
	cd build-asan && ctest --output-on-failure -L unit
	rm -rf $(ASAN_LOGS) && mkdir -p $(ASAN_LOGS)
	ASAN_OPTIONS=detect_leaks=0:log_path=$(ASAN_LOGS)/asan \
	UBSAN_OPTIONS=print_stacktrace=1:log_path=$(ASAN_LOGS)/ubsan \
	build-asan/sglr test spec/unit
	ASAN_OPTIONS=detect_leaks=0:log_path=$(ASAN_LOGS)/asan \
	UBSAN_OPTIONS=print_stacktrace=1:log_path=$(ASAN_LOGS)/ubsan \
	SGLR_BIN=$(CURDIR)/build-asan/sglr $(BUILD)/sglr test spec/functional
	@if ls $(ASAN_LOGS)/* >/dev/null 2>&1; then cat $(ASAN_LOGS)/*; \
	  echo "sanitizer reports above"; exit 1; fi

# libFuzzer targets (core/fuzz) built with clang, ASan and UBSan: the request
# parser path, the upstream response parser, the JSON extractor and splicer.
# `make fuzz` runs each for FUZZ_SECONDS, growing build-fuzz/corpus from the
# seeds in core/fuzz/corpus; `make test` runs each briefly so none can rot.
FUZZ_TARGETS = fuzz_json fuzz_request fuzz_response
FUZZ_SECONDS ?= 180
fuzz-build: deps
	CC=clang cmake -S . -B build-fuzz -DSGLR_FUZZ=ON -DCMAKE_BUILD_TYPE=Debug >/dev/null
	cmake --build build-fuzz -j $(JOBS) --target $(FUZZ_TARGETS)

fuzz: fuzz-build
	@for t in $(FUZZ_TARGETS); do mkdir -p build-fuzz/corpus/$$t; \
	  echo "== $$t ($(FUZZ_SECONDS) s)"; \
	  build-fuzz/$$t -max_total_time=$(FUZZ_SECONDS) -timeout=10 -print_final_stats=1 \
	    -artifact_prefix=build-fuzz/ build-fuzz/corpus/$$t core/fuzz/corpus/$$t 2>&1 | \
	    grep -E "^(#[0-9]+[[:space:]]+DONE|stat::|==[0-9]+==ERROR|SUMMARY|artifact)" ; \
	  test $${PIPESTATUS[0]} -eq 0 || exit 1; done

fuzz-smoke:
	$(MAKE) --no-print-directory fuzz FUZZ_SECONDS=$${FUZZ_SMOKE_SECONDS:-8}

demo: deps all
	$(BUILD)/sglr lua examples/demo.lua

# sglr, its man page and the sglang_router Python launchers (see
# packaging/install.sh): make install [PREFIX=/usr/local] [DESTDIR=...]
install: all
	PREFIX="$(PREFIX)" DESTDIR="$(DESTDIR)" PYTHON="$(PYTHON)" sh packaging/install.sh $(BUILD)

clean:
	rm -rf $(BUILD) build-asan build-fuzz
