// uWebSockets echo peer for bench/run: every message goes back to its
// sender with its opcode. Prints `LISTENING <port>` on stdout once it
// accepts connections, as the other servers do; SIGTERM ends it.
//
//   uws_echo [--port N] [--max-payload N]
//
// Built by bench/peers/build-uws against uWebSockets and uSockets from source
// (LIBUS_NO_SSL, UWS_NO_ZLIB): no TLS, no permessage-deflate.
#include "App.h"
#include "uws_args.h"

int main(int argc, char **argv) {
    PeerArgs a = parse_peer_args(argc, argv, "uws_echo");
    struct PerSocketData {};
    uWS::App().ws<PerSocketData>("/*", {
        .compression = uWS::DISABLED,
        .maxPayloadLength = a.max_payload,
        // 0: no idle timeout, so idle connections held by loadgen are not
        // pinged or dropped in the middle of a measurement.
        .idleTimeout = 0,
        .maxBackpressure = a.max_backpressure,
        .closeOnBackpressureLimit = false,
        .resetIdleTimeoutOnSend = false,
        .sendPingsAutomatically = false,
        .message = [](auto *ws, std::string_view message, uWS::OpCode opCode) {
            ws->send(message, opCode, false);
        },
    }).listen("127.0.0.1", a.port, [](auto *ls) { announce_port(ls); }).run();
    return 1;
}
