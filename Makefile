# duplex: `make` builds, `make check` runs every test, `make demo` runs the chat demo.
# Both check and demo install missing Debian packages first when run as root
# (or print the apt-get line to run otherwise): see scripts/deps.

LUA       ?= lua5.4
BUSTED    ?= busted --lua=$(LUA)
PREFIX    ?= /usr/local
LUA_INC   ?= $(shell pkg-config --cflags lua5.4 2>/dev/null || echo -I/usr/include/lua5.4)
LUAJIT_INC ?= $(shell pkg-config --cflags luajit 2>/dev/null || echo -I/usr/include/luajit-2.1)
LUA_LMOD  ?= $(PREFIX)/share/lua/5.4
LUA_CMOD  ?= $(PREFIX)/lib/lua/5.4
BINDIR    ?= $(PREFIX)/bin
LJ_LMOD   ?= $(PREFIX)/share/lua/5.1
LJ_CMOD   ?= $(PREFIX)/lib/lua/5.1
CC        ?= cc
OPT       ?= -O2 -g
WARN      = -Wall -Wextra -Wno-unused-parameter -Wshadow -Wstrict-prototypes -Werror=implicit-function-declaration
BASE_CFLAGS = -std=gnu11 -fPIC -fvisibility=hidden $(WARN) $(OPT)
DX_CFLAGS = $(BASE_CFLAGS) $(INC) $(LUA_INC) $(CFLAGS)
LJ_CFLAGS = $(BASE_CFLAGS) $(INC) $(LUAJIT_INC) $(CFLAGS)
LIBS      = -lssl -lcrypto -lz -lpthread
SAN       = -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined

# The layers are folders, each compiled by a glob (a new file needs no list):
#   csrc/proto  sans-I/O protocol code, no Lua, no syscalls: framing, engine,
#               UTF-8, masking, deflate, HTTP head parser, handshake rules;
#               what the fuzzers and the differential oracle link
#   csrc/io     the event loop, sockets, TLS, the clock
#   csrc/lua    the duplex.core binding
PROTO_SRC := $(wildcard csrc/proto/*.c)
IO_SRC    := $(wildcard csrc/io/*.c)
BIND_SRC  := $(wildcard csrc/lua/*.c)
SRC       := $(PROTO_SRC) $(IO_SRC) $(BIND_SRC)
HDR       := $(wildcard csrc/*/*.h)
INC       := -Icsrc/proto -Icsrc/io -Icsrc/lua
OBJ       := $(SRC:csrc/%.c=build/obj/%.o)
ASAN_OBJ  := $(SRC:csrc/%.c=build/asan-obj/%.o)

# LuaJIT (Lua 5.1 API, e.g. inside nginx with lua-nginx-module) gets the
# sans-I/O part only, and the clock for core.now: the event loop and sockets
# need lua_yieldk, which it lacks. l_compat.h maps the rest of the 5.4 API;
# nothing is linked against libluajit, the host provides it.
LJ_SRC    := $(PROTO_SRC) csrc/io/dx_clock.c \
             $(addprefix csrc/lua/,l_core.c l_util.c l_engine.c l_handshake.c l_pmd.c)
LJ_OBJ    := $(LJ_SRC:csrc/%.c=build/luajit-obj/%.o)
LJ_LIBS   = -lcrypto -lz

CORE      = build/duplex/core.so
ASAN_CORE = build/asan/duplex/core.so
LJ_CORE   = build/luajit/duplex/core.so

.PHONY: all check demo install install-luajit asan luajit lj-sources bench fuzz fuzz-build fuzz-long seeds clean deps spec spec-asan test-fuzz interop lint

all: $(CORE)

$(CORE): $(OBJ) | build/duplex
	$(CC) -shared -o $@ $(OBJ) $(LDFLAGS) $(LIBS)

build/obj/%.o: csrc/%.c $(HDR)
	@mkdir -p $(@D)
	$(CC) $(DX_CFLAGS) -c -o $@ $<

# The specs run a second time against a build with AddressSanitizer and
# UndefinedBehaviorSanitizer; lua5.4 itself is not instrumented, so the ASan
# runtime is preloaded (scripts/asan-env).
asan: $(ASAN_CORE)

$(ASAN_CORE): $(ASAN_OBJ) | build/asan/duplex
	$(CC) -shared $(SAN) -o $@ $(ASAN_OBJ) $(LDFLAGS) $(LIBS)

build/asan-obj/%.o: csrc/%.c $(HDR)
	@mkdir -p $(@D)
	$(CC) $(DX_CFLAGS) $(SAN) -O1 -c -o $@ $<

luajit: $(LJ_CORE)

# The files of the LuaJIT build, for spec/luajit_spec.lua.
lj-sources:
	@echo $(LJ_SRC)

$(LJ_CORE): $(LJ_OBJ) | build/luajit/duplex
	$(CC) -shared -o $@ $(LJ_OBJ) $(LDFLAGS) $(LJ_LIBS)

build/luajit-obj/%.o: csrc/%.c $(HDR)
	@mkdir -p $(@D)
	$(CC) $(LJ_CFLAGS) -c -o $@ $<

build/duplex build/asan/duplex build/luajit/duplex build/fuzz build/bench:
	mkdir -p $@

deps:
	@scripts/deps check

# Every suite writes its counts to build/results; scripts/total adds them up
# into the one closing line `N passed, N failed`.
check: deps
	@rm -rf build/results && mkdir -p build/results
	$(MAKE) all asan luajit fuzz-build seeds
	@rc=0; \
	scripts/suite lint       scripts/lint || rc=1; \
	scripts/suite spec       env BUSTED="$(BUSTED)" scripts/specs || rc=1; \
	scripts/suite spec-asan  scripts/asan-env env BUSTED="$(BUSTED)" scripts/specs || rc=1; \
	scripts/suite fuzz       scripts/fuzz-smoke || rc=1; \
	scripts/total; exit $$rc

# luacheck over the Lua code, settings in .luacheckrc; `make check` runs it
# as a suite (scripts/lint) and wants zero warnings.
lint:
	luacheck -q lua types examples spec bench

spec: all seeds
	$(BUSTED) spec

spec-asan: asan seeds
	scripts/asan-env $(BUSTED) spec

# libFuzzer harnesses (clang): one binary per fuzz/fuzz_*.c.
FUZZ_SRC  := $(wildcard fuzz/fuzz_*.c)
FUZZ_BIN  := $(FUZZ_SRC:fuzz/%.c=build/fuzz/%)
FUZZ_CC   ?= clang
FUZZ_TIME ?= 600

fuzz-build: $(FUZZ_BIN)

# fuzz_url and fuzz_resp embed Lua 5.4 to fuzz the parsers written in Lua.
LUA_LIB   ?= -llua5.4
build/fuzz/%: fuzz/%.c fuzz/lua_harness.h fuzz/fuzz_check.h fuzz/fuzz_choice.h $(PROTO_SRC) $(HDR) | build/fuzz
	$(FUZZ_CC) -g -O1 -std=gnu11 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
	  -Icsrc/proto $(LUA_INC) -o $@ $< $(PROTO_SRC) -lcrypto -lz $(LUA_LIB) -lm -ldl

fuzz: fuzz-build
	scripts/fuzz-smoke $(FUZZ_TIME)

# Every harness for FUZZ_CPU seconds of CPU time each, one after the other
# (the issue-level soak; `make fuzz` is the quick one).
FUZZ_CPU ?= 3600
fuzz-long: fuzz-build
	@for b in $(FUZZ_BIN); do scripts/fuzz-cpu $$(basename $$b) $(FUZZ_CPU) || exit 1; done

# The differential oracles of fuzz/fuzz_roundtrip.c and fuzz/fuzz_heartbeat.c
# on fixed seeds, without libFuzzer (gcc is enough), under ASan and UBSan:
# spec/roundtrip_spec.lua.
SEEDS_BIN := build/fuzz/roundtrip_seeds build/fuzz/heartbeat_seeds
seeds: $(SEEDS_BIN)

build/fuzz/%_seeds: fuzz/roundtrip_seeds.c fuzz/fuzz_%.c fuzz/fuzz_choice.h $(PROTO_SRC) $(HDR) | build/fuzz
	$(CC) -g -O1 -std=gnu11 $(SAN) -Icsrc/proto -o $@ fuzz/roundtrip_seeds.c fuzz/fuzz_$*.c $(PROTO_SRC) -lcrypto -lz

# A missing package only costs its peer (bench/run skips it and says why),
# so deps failing as non-root is not fatal here.
bench: all
	-@scripts/deps bench
	$(MAKE) -C bench run

# PORT=9000 make demo (or make demo PORT=9000) picks the port (8080).
demo:
	@scripts/deps demo
	$(MAKE) all
	$(LUA) examples/chat/server.lua $(if $(PORT),--port $(PORT))

# One core.so, the Lua modules and the command-line tool; `luarocks make`
# runs this same target with the rock tree's directories (rockspec/).
install: all
	install -d $(DESTDIR)$(LUA_LMOD)/duplex/redis $(DESTDIR)$(LUA_CMOD)/duplex $(DESTDIR)$(BINDIR)
	install -m 644 lua/duplex/*.lua $(DESTDIR)$(LUA_LMOD)/duplex/
	install -m 644 lua/duplex/redis/*.lua $(DESTDIR)$(LUA_LMOD)/duplex/redis/
	install -m 755 $(CORE) $(DESTDIR)$(LUA_CMOD)/duplex/core.so
	install -m 755 bin/duplex $(DESTDIR)$(BINDIR)/duplex

# The OpenResty/LuaJIT variant: the sans-I/O core, the modules that
# duplex.nginx needs and the Redis client over its cosockets, which are the
# ones that run on Lua 5.1.
LJ_LUA    := $(addprefix lua/duplex/,compat.lua core.lua handshake.lua nginx.lua options.lua resp.lua runtime.lua transport.lua url.lua websocket.lua)
LJ_REDIS  := lua/duplex/redis/client.lua
install-luajit: luajit
	install -d $(DESTDIR)$(LJ_LMOD)/duplex/redis $(DESTDIR)$(LJ_CMOD)/duplex
	install -m 644 $(LJ_LUA) $(DESTDIR)$(LJ_LMOD)/duplex/
	install -m 644 $(LJ_REDIS) $(DESTDIR)$(LJ_LMOD)/duplex/redis/
	install -m 755 $(LJ_CORE) $(DESTDIR)$(LJ_CMOD)/duplex/core.so

# lua/duplex/core.so: where builds before 0.2.0 put the core.
clean:
	rm -rf build lua/duplex/core.so
