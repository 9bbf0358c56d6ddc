# duplex: `make` builds, `make check` runs every test, `make demo` runs the chat demo.
# Both check and demo install missing Debian packages first when run as root
# (or print the apt-get line to run otherwise): see scripts/deps.

LUA       ?= lua5.4
BUSTED    ?= busted --lua=$(LUA)
PREFIX    ?= /usr/local
LUA_INC   ?= $(shell pkg-config --cflags lua5.4 2>/dev/null || echo -I/usr/include/lua5.4)
LUA_LMOD  ?= $(PREFIX)/share/lua/5.4
LUA_CMOD  ?= $(PREFIX)/lib/lua/5.4
CC        ?= cc
OPT       ?= -O2 -g
WARN      = -Wall -Wextra -Wno-unused-parameter -Wshadow -Wstrict-prototypes
DX_CFLAGS = -std=gnu11 -fPIC -fvisibility=hidden $(WARN) $(OPT) $(LUA_INC) $(CFLAGS)
LIBS      = -lssl -lcrypto -lz -lpthread
SAN       = -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined

SRC       := $(wildcard csrc/*.c)
HDR       := $(wildcard csrc/*.h)
OBJ       := $(SRC:csrc/%.c=build/obj/%.o)
ASAN_OBJ  := $(SRC:csrc/%.c=build/asan-obj/%.o)
ENGINE_SRC := $(filter csrc/dx_%.c,$(SRC))

CORE      = lua/duplex/core.so
ASAN_CORE = build/asan/duplex/core.so

.PHONY: all check demo install asan bench fuzz fuzz-build clean deps spec spec-asan test-fuzz interop

all: $(CORE)

$(CORE): $(OBJ)
	$(CC) -shared -o $@ $(OBJ) $(LDFLAGS) $(LIBS)

build/obj/%.o: csrc/%.c $(HDR) | build/obj
	$(CC) $(DX_CFLAGS) -c -o $@ $<

# The specs run a second time against a build with AddressSanitizer and
# UndefinedBehaviorSanitizer; lua5.4 itself is not instrumented, so the ASan
# runtime is preloaded (scripts/asan-env).
asan: $(ASAN_CORE)

$(ASAN_CORE): $(ASAN_OBJ) | build/asan/duplex
	$(CC) -shared $(SAN) -o $@ $(ASAN_OBJ) $(LDFLAGS) $(LIBS)

build/asan-obj/%.o: csrc/%.c $(HDR) | build/asan-obj
	$(CC) $(DX_CFLAGS) $(SAN) -O1 -c -o $@ $<

build/obj build/asan-obj build/asan/duplex build/fuzz build/bench:
	mkdir -p $@

deps:
	@scripts/deps check

# Every suite writes its counts to build/results; scripts/total adds them up
# into the one closing line `N passed, N failed`.
check: deps
	@rm -rf build/results && mkdir -p build/results
	$(MAKE) all asan fuzz-build
	@rc=0; \
	scripts/suite spec       env BUSTED="$(BUSTED)" scripts/specs || rc=1; \
	scripts/suite spec-asan  scripts/asan-env env BUSTED="$(BUSTED)" scripts/specs || rc=1; \
	scripts/suite fuzz       scripts/fuzz-smoke || rc=1; \
	scripts/total; exit $$rc

spec: all
	$(BUSTED) spec

spec-asan: asan
	scripts/asan-env $(BUSTED) spec

# libFuzzer harnesses (clang): one binary per fuzz/fuzz_*.c.
FUZZ_SRC  := $(wildcard fuzz/fuzz_*.c)
FUZZ_BIN  := $(FUZZ_SRC:fuzz/%.c=build/fuzz/%)
FUZZ_CC   ?= clang
FUZZ_TIME ?= 600

fuzz-build: $(FUZZ_BIN)

build/fuzz/%: fuzz/%.c $(ENGINE_SRC) $(HDR) | build/fuzz
	$(FUZZ_CC) -g -O1 -std=gnu11 -fsanitize=fuzzer,address,undefined -Icsrc -o $@ $< $(ENGINE_SRC) $(LIBS)

fuzz: fuzz-build
	scripts/fuzz-smoke $(FUZZ_TIME)

bench: all
	$(MAKE) -C bench run

demo:
	@scripts/deps demo
	$(MAKE) all
	$(LUA) examples/chat/server.lua

install: all
	install -d $(DESTDIR)$(LUA_LMOD)/duplex $(DESTDIR)$(LUA_CMOD)/duplex
	install -m 644 lua/duplex/*.lua $(DESTDIR)$(LUA_LMOD)/duplex/
	install -m 755 $(CORE) $(DESTDIR)$(LUA_CMOD)/duplex/core.so

clean:
	rm -rf build $(CORE)
