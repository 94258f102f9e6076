"""Hub names and the hub probe (:mod:`gsae.hf.hub`)."""

from gsae.hf.hub import hub_id


def test_short_names_map_to_pythia():
    assert hub_id("pythia-160m") == "EleutherAI/pythia-160m"
    assert hub_id("pythia-1b") == "EleutherAI/pythia-1b"
    assert hub_id("pythia-410m-deduped") == "EleutherAI/pythia-410m-deduped"
    assert hub_id("gpt2") == "gpt2"


def test_the_hub_probe_asks_the_configured_endpoint_through_the_proxy(monkeypatch):
    """A cluster reaches the hub through HTTPS_PROXY/HTTP_PROXY or a mirror in HF_ENDPOINT: the
    probe must go where huggingface_hub would."""
    import http.server
    import threading

    from huggingface_hub import close_session, constants

    from gsae.hf.hub import hub_reachable

    asked = []

    class Proxy(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            asked.append(self.path)
            self.send_response(200)
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for var in ("HF_HUB_OFFLINE", "NO_PROXY", "no_proxy"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read when first imported
        monkeypatch.setenv("HF_ENDPOINT", "http://hub-mirror.invalid")
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.server_port}")
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{server.server_port}")
        close_session()  # huggingface_hub reads the proxy settings when it makes its client
        assert hub_reachable(timeout=5)
        assert asked and "hub-mirror.invalid" in asked[0], asked
    finally:
        server.shutdown()
        close_session()
