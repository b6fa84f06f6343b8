"""Client of the `toonark` ensemble over HTTP or gRPC (tritonclient), with a per-stage profile.

    result = generate(api.DEFAULT_HTTP_URL, GenerateOptions(prompt="a happy robot", seed=3), protocol="http")
    open("robot.png", "wb").write(result.images[0])

Optional inputs left as None are not sent, so the server's defaults apply. The profile comes
from Triton's statistics API: the per-model deltas of the success counters around the request
(exact when this client is the server's only user).

Retry policy (RetryPolicy, on by default; every request is idempotent: seeded, no server state): a request
is sent again, after a jittered exponential back-off, only when the failure says the server could not run
it *now* and may later: gRPC UNAVAILABLE / HTTP 503 (a model reloading or not ready, a full queue), a
connection error (server down or restarting), the INTERNAL error of a Python model process that died
("Stub process '<model>_0_0' is not healthy.", which the launcher's watchdog heals in seconds), and a
model that exists but is not ready ("Model 'unet' is not ready", "... has no available versions"). Never a
refusal (400 / INVALID_ARGUMENT), a timeout or any other server error. Bounded by attempts and seconds.
With several URLs (servers) a retried request goes to the next one: failover.
"""
from __future__ import annotations

import http.client
import logging
import random
import re
import time

from dataclasses import dataclass, field

import numpy as np

from toonark import api
from toonark.api import ENSEMBLE, ENSEMBLE_INPUTS, ENSEMBLE_OUTPUTS, NSFW_OUTPUT, PIXELS_OUTPUT, RAW_FORMAT

PROTOCOLS = ("http", "grpc")
# Stages in request order; `unet` runs once per step, called by `denoise`.
STAGES = ("preprocess", "text_encoder", "denoise", "unet", "transformer", "vae_decoder", "safety_checker",
          "postprocess")   # transformer: the Qwen-Image family's step model (toonark.family.QwenImage)

_NUMPY = api.NUMPY_TYPES
_WIRE = {"STRING": "BYTES"}


log = logging.getLogger(__name__)


class ServerError(RuntimeError):
    """The server (or the connection to it) failed the request; the message is one line. `retryable`: the
    failure is one RetryPolicy retries (the request may succeed later or on another server)."""

    def __init__(self, message: str, retryable: bool = False, attempts: int = 1):
        super().__init__(message)
        self.retryable = retryable
        self.attempts = attempts
        self.connection = False   # the connection itself failed (reopen it before another try)


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retry of transient failures (module docstring): at most `attempts` tries in all and no new try
    `max_seconds` after the first; wait i (i = 1, 2, ...) is uniform in [0, min(max_backoff_s,
    backoff_s * 2**(i-1))] ("full jitter": clients that failed together do not come back together)."""
    attempts: int = 10
    max_seconds: float = 60.0
    backoff_s: float = 0.2
    max_backoff_s: float = 2.0

    def __post_init__(self):
        if self.attempts < 1:
            raise ValueError(f"retry attempts must be >= 1 (1: no retry), got {self.attempts}")
        if not (self.max_seconds >= 0 and self.backoff_s >= 0 and self.max_backoff_s >= 0):
            raise ValueError("retry max_seconds, backoff_s and max_backoff_s must be >= 0")

    def delay(self, retry: int, rng=random) -> float:
        return rng.uniform(0, min(self.max_backoff_s, self.backoff_s * 2 ** (retry - 1)))


DEFAULT_RETRY = RetryPolicy()
NO_RETRY = RetryPolicy(attempts=1)

# What a retry may fix (module docstring). Statuses as tritonclient reports them: gRPC "StatusCode.X", HTTP the code.
RETRY_STATUSES = frozenset({"StatusCode.UNAVAILABLE", "503"})
# A dead Python-backend stub answers INTERNAL with this message (recipe gotcha 8); BLS callers pass it on.
STUB_DIED = re.compile(r"Stub process '[^']*' is not healthy")
# A model being (re)loaded: Triton answers these with INTERNAL / 400 although they are transient; only
# for a model that exists ("...is not found" for an unknown name is not retried).
NOT_READY = re.compile(r"Model '[^']*' is not ready|Request for unknown model: '[^']*' has no available versions")


def is_retryable(status: str | None, message: str) -> bool:
    """Whether a failed request (tritonclient's status, message) is worth sending again."""
    if status in RETRY_STATUSES:
        return True
    return bool(STUB_DIED.search(message) or NOT_READY.search(message))


@dataclass
class GenerateOptions:
    prompt: str | list[str]
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    preset: str | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    num_images: int | None = None   # 1..4 images of one prompt; image i uses seed + i
    quality: int | None = None      # WebP quality 1..100 (server default api.DEFAULT_QUALITY); PNG ignores it
    lora: str | None = None         # a registered LoRA style name ("" or None: the base model)
    lora_scale: float | None = None # its strength 0..2 (server default api.DEFAULT_LORA_SCALE)
    image_in: bytes | None = None   # a PNG / WebP / JPEG file to edit (image-to-image)
    mask_in: bytes | None = None    # with image_in: white = repaint (inpainting)
    strength: float | None = None   # 0 < s <= 1 (server default api.DEFAULT_STRENGTH, inpainting 1.0)

    def inputs(self) -> dict[str, np.ndarray]:
        """Ensemble input name -> value, only for the values set (ENSEMBLE_INPUTS order; each input is the
        field of the same name in lower case)."""
        if self.prompt is None:
            raise ValueError("PROMPT is required")
        out = {}
        for port in ENSEMBLE_INPUTS:
            value = getattr(self, port.name.lower())
            if port.dims == (-1,) and isinstance(value, tuple):   # one entry per image (PROMPT, NEGATIVE_PROMPT)
                value = list(value)
            if value is None:
                continue
            values = value if isinstance(value, list) else [value]
            if port.triton_type == "STRING":
                values = [v.encode("utf-8") if isinstance(v, str) else v for v in values]
            out[port.name] = np.array(values, dtype=_NUMPY[port.triton_type])
        return out


@dataclass
class GenerateResult:
    images: list[bytes]
    seconds: float
    stages_ms: dict[str, dict] = field(default_factory=dict)   # model -> {"calls", "total_ms", "per_call_ms"}
    # One flag per image when the server runs a safety checker (True: flagged, the image is blank white);
    # None when it has none.
    nsfw: list[bool] | None = None
    # With timings: the tile grid the picture was made with (sizes above the profile, toonark.tiling), else
    # "untiled (...)"; None when the server does not say (a repository without the `tiling` parameter).
    tiles: str | None = None
    pixels: np.ndarray | None = None   # FORMAT=raw: uint8 (B, H, W, 3); `images` then holds empty strings
    attempts: int = 1          # tries it took (RetryPolicy)
    url: str | None = None     # the server that answered


def one_line(message: str) -> str:
    return " ".join(str(message).split())


def _module(protocol: str):
    if protocol == "http":
        import tritonclient.http as module
    elif protocol == "grpc":
        import tritonclient.grpc as module
    else:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    return module


def connect(url: str, protocol: str = "http", timeout_s: float = 600.0):
    module = _module(protocol)
    if protocol == "http":
        return module.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
    return module.InferenceServerClient(url)


def model_statistics(client, protocol: str) -> dict[str, dict]:
    """{model: {"count": successful executions, "ns": their total time}} from the statistics API."""
    stats = client.get_inference_statistics(**({"as_json": True} if protocol == "grpc" else {}))
    out = {}
    for entry in stats.get("model_stats", []):
        success = entry.get("inference_stats", {}).get("success", {})
        out[entry["name"]] = {"count": int(success.get("count", 0)), "ns": int(success.get("ns", 0))}
    return out


def settled_statistics(client, protocol: str, timeout_s: float = 2.0) -> dict[str, dict]:
    """Statistics once they stop moving: the ensemble's response can reach the client before Triton
    has recorded its last step (postprocess), so read until two reads in a row agree."""
    deadline = time.monotonic() + timeout_s
    stats = model_statistics(client, protocol)
    while time.monotonic() < deadline:
        time.sleep(0.02)
        again = model_statistics(client, protocol)
        if again == stats:
            break
        stats = again
    return stats


def stage_profile(before: dict, after: dict) -> dict[str, dict]:
    profile = {}
    for name in STAGES + (ENSEMBLE,):
        if name not in after:
            continue
        calls = after[name]["count"] - before.get(name, {}).get("count", 0)
        total = (after[name]["ns"] - before.get(name, {}).get("ns", 0)) / 1e6
        profile[name] = {"calls": calls, "total_ms": round(total, 2),
                         "per_call_ms": round(total / calls, 2) if calls else None}
    return profile


class Connections:
    """Open clients by URL, reused across requests (one per URL; not thread-safe: one per thread). A client
    whose connection failed is closed and opened again on its next use."""

    def __init__(self, protocol: str = "http", timeout_s: float = 600.0):
        _module(protocol)
        self.protocol, self.timeout_s = protocol, timeout_s
        self._clients: dict[str, object] = {}

    def get(self, url: str):
        if url not in self._clients:
            self._clients[url] = connect(url, self.protocol, self.timeout_s)
        return self._clients[url]

    def adopt(self, url: str, client) -> None:
        """Use the caller's open `client` for `url` (it stays the caller's: see release)."""
        self._clients.setdefault(url, client)

    def release(self, url: str, client) -> None:
        """Forget the caller's `client` without closing it."""
        if self._clients.get(url) is client:
            del self._clients[url]

    def drop(self, url: str) -> None:
        client = self._clients.pop(url, None)
        if client is not None:
            try:
                client.close()
            except Exception:   # noqa: BLE001 - a broken connection may fail to close; it is dropped anyway
                pass

    def close(self) -> None:
        for url in list(self._clients):
            self.drop(url)

    def __enter__(self) -> "Connections":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def generate(url: str | list[str] | tuple[str, ...], options: GenerateOptions, protocol: str = "http", *,
             timings: bool = False, timeout_s: float = 600.0, client=None, connections: Connections | None = None,
             retry: RetryPolicy | None = DEFAULT_RETRY) -> GenerateResult:
    """One request to the `toonark` ensemble. Raises ServerError with a one-line message on any
    server or connection failure (after the retries `retry` allows; None or NO_RETRY: one try), and when
    the response carries no image.
    url: one HOST:PORT, or several (servers): the first try goes to the first, each retry to the next.
    client: an open `connect(url, protocol, timeout_s)` of the (first) url to reuse (left open);
    connections: a Connections to reuse (left open); neither: connections for this request only."""
    urls = [url] if isinstance(url, str) else list(url)
    if not urls:
        raise ValueError("no server URL given")
    policy = retry or NO_RETRY
    own = connections is None
    pool = connections if connections is not None else Connections(protocol, timeout_s)
    if client is not None:
        pool.adopt(urls[0], client)
    started = time.monotonic()
    attempt = 0
    try:
        while True:
            attempt += 1
            target = urls[(attempt - 1) % len(urls)]
            try:
                result = _generate_once(target, options, protocol, timings, timeout_s, pool)
                result.attempts, result.url = attempt, target
                return result
            except ServerError as err:
                err.attempts = attempt
                if err.connection and not (client is not None and target == urls[0]):
                    pool.drop(target)
                if (not err.retryable or attempt >= policy.attempts
                        or time.monotonic() - started >= policy.max_seconds):
                    raise
                wait = min(policy.delay(attempt), max(0.0, policy.max_seconds - (time.monotonic() - started)))
                log.info("retry %d/%d in %.2f s (%s): %s", attempt, policy.attempts - 1, wait, target, err)
                time.sleep(wait)
    finally:
        if client is not None:
            pool.release(urls[0], client)   # the caller's client stays open
        if own:
            pool.close()


def _generate_once(url: str, options: GenerateOptions, protocol: str, timings: bool, timeout_s: float,
                   pool: Connections) -> GenerateResult:
    module = _module(protocol)
    from tritonclient.utils import InferenceServerException
    inputs = []
    for name, value in options.inputs().items():
        port = next(p for p in ENSEMBLE_INPUTS if p.name == name)
        tensor = module.InferInput(name, list(value.shape), _WIRE.get(port.triton_type, port.triton_type))
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    output_name = ENSEMBLE_OUTPUTS[0].name
    raw = (options.format or "").lower() == RAW_FORMAT
    try:
        client = pool.get(url)
        before = model_statistics(client, protocol) if timings else {}
        start = time.perf_counter()
        kwargs = {"client_timeout": timeout_s} if protocol == "grpc" else {}
        # No output list: the server returns all, NSFW included when the build has a safety checker.
        response = client.infer(ENSEMBLE, inputs, **kwargs)
        seconds = time.perf_counter() - start
        after = settled_statistics(client, protocol) if timings else {}
        images = response.as_numpy(output_name)
        pixels = response.as_numpy(PIXELS_OUTPUT.name)
        nsfw = response.as_numpy(NSFW_OUTPUT.name)
        tiling = _tiling_parameter(client, protocol) if timings else None
    except InferenceServerException as err:
        message = one_line(err.message() or str(err))
        status = err.status()
        # gRPC reports a refused or broken connection as UNAVAILABLE; reconnect before the next try.
        error = ServerError(message, is_retryable(status, message))
        error.connection = status == "StatusCode.UNAVAILABLE" and any(
            word in message.lower() for word in ("connect", "socket", "closed", "reset"))
        raise error from None
    except (ConnectionError, OSError, http.client.HTTPException) as err:   # HTTP: refused, reset, closed mid-reply
        error = ServerError(f"cannot reach the {protocol} endpoint {url}: {one_line(err)} "
                            f"(is `make serve` running on that port?)", retryable=True)
        error.connection = True
        raise error from None
    flags = None if nsfw is None else [bool(v) for v in nsfw.reshape(-1)]
    profile = stage_profile(before, after) if timings else {}
    if raw:   # FORMAT=raw: the pixels; IMAGE holds empty strings
        if pixels is None or pixels.size == 0:
            raise ServerError(f"the server answered without {PIXELS_OUTPUT.name} data; check the server's log")
        result = GenerateResult([b""] * len(pixels), seconds, profile, flags, pixels=pixels)
        size = pixels.shape[1:3]
    else:
        if images is None or images.size == 0 or any(len(image) == 0 for image in images.reshape(-1)):
            raise ServerError(f"the server answered without {output_name} data; check the server's log")
        result = GenerateResult([bytes(image) for image in images.reshape(-1)], seconds, profile, flags)
        size = None
    if tiling:
        if size is None:
            from PIL import Image
            import io
            width, height = Image.open(io.BytesIO(result.images[0])).size   # the header only
            size = (height, width)
        from toonark.tiling import describe_grid
        result.tiles = describe_grid(tiling, *size)
    return result


def _tiling_parameter(client, protocol: str) -> str | None:
    """The denoise model's `tiling` config parameter (serving.repository writes it), None when absent."""
    config = client.get_model_config("denoise", **({"as_json": True} if protocol == "grpc" else {}))
    config = config.get("config", config)
    entry = config.get("parameters", {}).get("tiling")
    if isinstance(entry, dict):
        entry = entry.get("string_value") or entry.get("stringValue")
    return entry or None


def format_profile(result: GenerateResult) -> str:
    lines = [f"{'stage':<14}{'calls':>6}{'total ms':>11}{'ms/call':>10}"]
    for name, row in result.stages_ms.items():
        per_call = f"{row['per_call_ms']:.1f}" if row["per_call_ms"] is not None else "-"
        lines.append(f"{name:<14}{row['calls']:>6}{row['total_ms']:>11.1f}{per_call:>10}")
    lines.append(f"{'client':<14}{1:>6}{result.seconds * 1e3:>11.1f}")
    if result.tiles:
        lines.append(f"tiles: {result.tiles}")
    return "\n".join(lines)
