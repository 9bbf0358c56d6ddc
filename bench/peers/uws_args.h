// What the uWebSockets peers share: their options and the port line that
// bench/run waits for.
#pragma once
#include <cstdio>
#include <cstdlib>
#include <cstring>

struct PeerArgs {
    int port = 0;
    // 16 MiB by default; bench/run passes --max-payload 32 MiB for the
    // 16 MiB echo, as it does to the other servers.
    unsigned int max_payload = 16u << 20;
    // Above this much unsent data uWS drops messages: keep it clear of the
    // largest echo (16 MiB) and of a broadcast burst.
    unsigned int max_backpressure = 64u << 20;
};

static PeerArgs parse_peer_args(int argc, char **argv, const char *name) {
    PeerArgs a;
    for (int i = 1; i < argc; i += 2) {
        if (i + 1 >= argc) {
            std::fprintf(stderr, "%s: %s needs a value\n", name, argv[i]);
            std::exit(2);
        }
        char *end;
        unsigned long v = std::strtoul(argv[i + 1], &end, 10);
        if (*end || end == argv[i + 1]) {
            std::fprintf(stderr, "%s: bad value for %s\n", name, argv[i]);
            std::exit(2);
        }
        if (!std::strcmp(argv[i], "--port") && v < 65536) a.port = (int) v;
        else if (!std::strcmp(argv[i], "--max-payload") && v > 0 && v <= (1ul << 30)) {
            a.max_payload = (unsigned int) v;
            if (a.max_backpressure < 2 * a.max_payload) a.max_backpressure = 2 * a.max_payload;
        } else {
            std::fprintf(stderr, "usage: %s [--port N] [--max-payload N]\n", name);
            std::exit(2);
        }
    }
    return a;
}

static void announce_port(us_listen_socket_t *ls) {
    if (!ls) {
        std::fprintf(stderr, "listen failed\n");
        std::exit(1);
    }
    std::printf("LISTENING %d\n", us_socket_local_port(0, (us_socket_t *) ls));
    std::fflush(stdout);
}
