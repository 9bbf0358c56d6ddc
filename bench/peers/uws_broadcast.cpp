// uWebSockets broadcast peer for bench/run, the twin of
// node_broadcast_server.js: every message from any client goes to every
// connected client, the sender included, with its opcode. Uses uWS's own
// pub/sub (one topic), its idiomatic way to fan out. Prints `LISTENING
// <port>` once it accepts connections; SIGTERM ends it.
//
//   uws_broadcast [--port N] [--max-payload N]
#include "App.h"
#include "uws_args.h"

int main(int argc, char **argv) {
    PeerArgs a = parse_peer_args(argc, argv, "uws_broadcast");
    struct PerSocketData {};
    uWS::App app;
    app.ws<PerSocketData>("/*", {
        .compression = uWS::DISABLED,
        .maxPayloadLength = a.max_payload,
        .idleTimeout = 0,
        .maxBackpressure = a.max_backpressure,
        .closeOnBackpressureLimit = false,
        .resetIdleTimeoutOnSend = false,
        .sendPingsAutomatically = false,
        .open = [](auto *ws) { ws->subscribe("all"); },
        // app.publish, not ws->publish: the latter skips the sender.
        .message = [&app](auto */*ws*/, std::string_view message, uWS::OpCode opCode) {
            app.publish("all", message, opCode, false);
        },
    }).listen("127.0.0.1", a.port, [](auto *ls) { announce_port(ls); }).run();
    return 1;
}
