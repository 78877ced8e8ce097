"""The attribute names and values the spans use: OpenTelemetry semantic conventions.

GenAI names follow the released GenAI conventions (the ``gen_ai.*`` registry,
status Development; ``opentelemetry-semantic-conventions``'
``_incubating.attributes.gen_ai_attributes`` holds the same strings, and a
test checks they agree). They are written out here because that module
marks the GenAI names as moved to the GenAI conventions repository, and the
proxy must not depend on a deprecation shim.

The conventions' transition plan (``OTEL_SEMCONV_STABILITY_OPT_IN``):
by default the proxy emits the names of the release it was built against,
plus ``gen_ai.system`` (the pre-1.37 name of ``gen_ai.provider.name``) for
backends that still key on it. With ``gen_ai_latest_experimental`` in that
comma-separated list it emits the latest experimental names only: no
``gen_ai.system``, and ``gen_ai.response.time_to_first_chunk`` on the spans
of a streamed response.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["OPERATIONS", "PROVIDERS", "latest_experimental", "operation_for"]

# -- GenAI --------------------------------------------------------------------------------
OPERATION_NAME = "gen_ai.operation.name"
PROVIDER_NAME = "gen_ai.provider.name"
SYSTEM = "gen_ai.system"  # deprecated: gen_ai.provider.name (emitted unless latest is opted in)
REQUEST_MODEL = "gen_ai.request.model"
REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
REQUEST_TEMPERATURE = "gen_ai.request.temperature"
REQUEST_TOP_P = "gen_ai.request.top_p"
REQUEST_TOP_K = "gen_ai.request.top_k"
REQUEST_STREAM = "gen_ai.request.stream"
REQUEST_SEED = "gen_ai.request.seed"
REQUEST_STOP_SEQUENCES = "gen_ai.request.stop_sequences"
REQUEST_FREQUENCY_PENALTY = "gen_ai.request.frequency_penalty"
REQUEST_PRESENCE_PENALTY = "gen_ai.request.presence_penalty"
REQUEST_CHOICE_COUNT = "gen_ai.request.choice.count"
RESPONSE_MODEL = "gen_ai.response.model"
RESPONSE_ID = "gen_ai.response.id"
RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
RESPONSE_TIME_TO_FIRST_CHUNK = "gen_ai.response.time_to_first_chunk"
USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
USAGE_CACHE_READ_INPUT_TOKENS = "gen_ai.usage.cache_read.input_tokens"
USAGE_CACHE_CREATION_INPUT_TOKENS = "gen_ai.usage.cache_creation.input_tokens"
USAGE_REASONING_OUTPUT_TOKENS = "gen_ai.usage.reasoning.output_tokens"
INPUT_MESSAGES = "gen_ai.input.messages"
OUTPUT_MESSAGES = "gen_ai.output.messages"
SYSTEM_INSTRUCTIONS = "gen_ai.system_instructions"

# -- HTTP, server, error --------------------------------------------------------------------
HTTP_REQUEST_METHOD = "http.request.method"
HTTP_RESPONSE_STATUS_CODE = "http.response.status_code"
URL_PATH = "url.path"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
CLIENT_ADDRESS = "client.address"
ERROR_TYPE = "error.type"

# -- the proxy's own ------------------------------------------------------------------------
REQUEST_ID = "llmproxy.request_id"
ATTEMPT_NUMBER = "llmproxy.attempt.number"
ATTEMPT_OUTCOME = "llmproxy.attempt.outcome"
ATTEMPTS = "llmproxy.attempts"
UPSTREAM_NAME = "llmproxy.upstream.name"
KEY_ID = "llmproxy.key_id"
COST_USD = "llmproxy.cost_usd"
#: The event at the first token (the first response body byte written to the client).
FIRST_TOKEN_EVENT = "gen_ai.first_token"

#: ``gen_ai.operation.name`` by the path the client called.
OPERATIONS: Mapping[str, str] = {
    "/v1/chat/completions": "chat",
    "/v1/messages": "chat",
    "/v1/responses": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
}

#: ``gen_ai.provider.name`` by routing's provider ``type`` (the conventions' well-known values).
PROVIDERS: Mapping[str, str] = {
    "openai": "openai",
    "anthropic": "anthropic",
    "azure": "azure.ai.openai",
}


def operation_for(path: str) -> str | None:
    """The GenAI operation of a client path (query string ignored), None for a non-GenAI path."""
    query = path.find("?")
    return OPERATIONS.get(path if query < 0 else path[:query])


def latest_experimental(environ: Mapping[str, str] = os.environ) -> bool:
    """``OTEL_SEMCONV_STABILITY_OPT_IN`` lists ``gen_ai_latest_experimental``."""
    raw = environ.get("OTEL_SEMCONV_STABILITY_OPT_IN", "")
    return "gen_ai_latest_experimental" in (part.strip() for part in raw.split(","))
