# Thin wrapper over CMake; see README.md.
BUILD ?= build
JOBS  ?= $(shell nproc)
DEB_PACKAGES = build-essential cmake pkg-config libluajit2-5.1-dev libuv1-dev lua-luv-dev lua-luv \
  node-llhttp libcurl4-openssl-dev lua-cjson lua-busted lua-argparse curl wrk nginx-light prometheus

.PHONY: all deps test test-asan demo bench clean

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

test: deps all test-asan
	cd $(BUILD) && ctest --output-on-failure -j 2

# C unit tests again under AddressSanitizer + UBSan.
test-asan: deps
	cmake -S . -B build-asan -DSGLR_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug >/dev/null
	cmake --build build-asan -j $(JOBS) --target $$(cd core/test && ls test_*.c | sed 's/\.c$$//' | tr '\n' ' ')
	cd build-asan && ctest --output-on-failure -L unit

demo: deps all
	$(BUILD)/sglr lua examples/demo.lua

clean:
	rm -rf $(BUILD) build-asan
