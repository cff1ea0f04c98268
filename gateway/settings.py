"""The gateway's settings: one dataclass, read from the environment in one place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from npcbus.settings import Settings, SettingsError, env_field


def _positive(x) -> bool:
    return x > 0


def _nonneg(x) -> bool:
    return x >= 0


def _token_ok(tokens: list[str]) -> bool:
    # Tokens travel in an HTTP header (and, from browsers, in a WebSocket subprotocol), so they
    # must be plain visible ASCII without separators.
    allowed = set("!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
    return all(t and set(t) <= allowed for t in tokens)


@dataclass
class GatewaySettings(Settings):
    """The gateway: WebSocket NPC chat, HTTP generation, OpenAI-compatible API, playground."""

    title: ClassVar[str] = "gateway"

    host: str = env_field("GATEWAY_HOST", "127.0.0.1", "Address the gateway listens on (`0.0.0.0` for every interface).")
    port: int = env_field("GATEWAY_PORT", 8080, "Port the gateway listens on.", check=lambda p: 0 <= p <= 65535,
                          check_msg="must be between 0 and 65535")
    api_tokens: list[str] = env_field(
        "API_TOKEN", [], "Bearer token(s) clients must send (`Authorization: Bearer ...`); several separated by commas. "
        "Use letters, digits and -._~+ (HTTP token characters; no spaces or commas).", check=_token_ok,
        check_msg="tokens may hold only HTTP token characters (letters, digits, -._~+!#$%&'*^`|)", secret=True)
    require_api_token: bool = env_field(
        "REQUIRE_API_TOKEN", True, "Refuse requests without a valid API token (every route but /health and the "
        "playground's static files). Turning it off is for local development only.")
    rate_limit_rps: float = env_field(
        "RATE_LIMIT_RPS", 10.0, "Sustained requests (HTTP requests, WebSocket turns) per second per token (per "
        "client address without auth); 0 turns the limit off.", check=_nonneg, check_msg="must be >= 0")
    rate_limit_burst: int = env_field("RATE_LIMIT_BURST", 20, "Requests a token may make at once above the sustained rate.",
                                      check=_positive, check_msg="must be > 0")
    max_request_bytes: int = env_field("MAX_REQUEST_BYTES", 1 << 20, "Largest HTTP request body accepted (bytes); larger gets 413.",
                                       check=lambda n: n >= 1024, check_msg="must be >= 1024")
    max_frame_bytes: int = env_field("MAX_FRAME_BYTES", 64 * 1024, "Largest WebSocket message accepted (bytes); larger closes the socket with 1009.",
                                     check=lambda n: n >= 1024, check_msg="must be >= 1024")
    max_concurrency: int = env_field(
        "GATEWAY_MAX_CONCURRENCY", 256, "Generations in flight through this gateway at once; more get 503 (WebSocket: an "
        "`overloaded` error) with Retry-After.", check=_positive, check_msg="must be > 0")
    max_ws_sessions: int = env_field("MAX_WS_SESSIONS", 2000, "Open WebSocket sessions at once; more are closed with 1013.",
                                     check=_positive, check_msg="must be > 0")
    max_pending_turns: int = env_field("MAX_PENDING_TURNS", 4, "Turns a WebSocket session may queue behind the running one.",
                                       check=_nonneg, check_msg="must be >= 0")
    max_batch: int = env_field("MAX_BATCH", 16, "Most entries in one `POST /generate` batch (`requests: [...]`).",
                               check=_positive, check_msg="must be > 0")
    request_timeout_s: float = env_field(
        "REQUEST_TIMEOUT_S", 60.0, "Deadline of one generation; becomes the bus message's expiry. Clients may ask "
        "for less.", check=_positive, check_msg="must be > 0")
    ws_heartbeat_s: float = env_field("WS_HEARTBEAT_S", 20.0, "WebSocket ping interval; a client that misses a pong is dropped.",
                                      check=_positive, check_msg="must be > 0")
    ws_start_timeout_s: float = env_field("WS_START_TIMEOUT_S", 30.0, "A WebSocket must start its session within this many seconds.",
                                          check=_positive, check_msg="must be > 0")
    ws_idle_timeout_s: float = env_field("WS_IDLE_TIMEOUT_S", 900.0, "A WebSocket session with no message for this long is closed (0: never).",
                                         check=_nonneg, check_msg="must be >= 0")
    session_resume_s: float = env_field(
        "SESSION_RESUME_S", 300.0, "How long a WebSocket session outlives its socket, so that a client that reconnects can "
        "resume it (`session.start` with `resume`); 0: sessions end with their socket.", check=_nonneg,
        check_msg="must be >= 0")
    session_store_url: str = env_field(
        "SESSION_STORE_URL", "", "Where WebSocket sessions are kept between sockets. Empty: in this gateway's memory (a "
        "session resumes only on the gateway that started it); `redis://host:port/db` (or `rediss://`, TLS): in Redis, "
        "shared by every gateway on the namespace, so that a session resumes on any of them (README, \"Several "
        "gateways\").", check=lambda u: u == "" or u.startswith(("redis://", "rediss://", "unix://")),
        check_msg="must be empty or start with redis://, rediss:// or unix://")
    session_store_password: str = env_field(
        "SESSION_STORE_PASSWORD", "", "Password of the session store (Redis AUTH), used when SESSION_STORE_URL carries "
        "none.", secret=True)
    session_lease_s: float = env_field(
        "SESSION_LEASE_S", 15.0, "With a shared session store: how long a gateway's hold on an attached session lasts "
        "unless renewed (every third of it); a crashed gateway's sessions become resumable elsewhere after this.",
        check=lambda x: x >= 0.3, check_msg="must be >= 0.3")
    session_max_bytes: int = env_field(
        "SESSION_MAX_BYTES", 1 << 20, "Largest stored session (bytes) in a shared session store; above it the oldest "
        "remembered turns are dropped from the stored copy.", check=lambda n: n >= 4096, check_msg="must be >= 4096")
    history_turns: int = env_field("HISTORY_TURNS", 10, "Earlier turns (player line + NPC line) a session keeps and sends with each prompt.",
                                   check=lambda n: 0 <= n <= 10, check_msg="must be between 0 and 10 (20 history lines)")
    turn_cache: int = env_field("TURN_CACHE", 16, "Finished turns a session remembers, so that a retried turn id is answered without running it again.",
                                check=_positive, check_msg="must be > 0")
    consumer_stale_s: float = env_field(
        "CONSUMER_STALE_S", 30.0, "An inference consumer not heard from for this long no longer counts as alive in /health.",
        check=_positive, check_msg="must be > 0")
    publish_experience: bool = env_field(
        "PUBLISH_EXPERIENCE", False, "Publish every finished NPC turn as experience (the feedback loop's input).")
    metrics_public: bool = env_field("METRICS_PUBLIC", False, "Serve /metrics without a token (for scrapers on a private network).")
    playground: bool = env_field("PLAYGROUND", True, "Serve the web playground at `/`.")
    cors_origins: list[str] = env_field("CORS_ORIGINS", [], "Origins allowed to call the HTTP API from a browser (comma-separated; `*` for any).")

    def validate(self) -> None:
        super().validate()
        if self.require_api_token and not self.api_tokens:
            raise SettingsError("API_TOKEN is empty while REQUIRE_API_TOKEN=true: set API_TOKEN (or "
                                "REQUIRE_API_TOKEN=false for local development)")
