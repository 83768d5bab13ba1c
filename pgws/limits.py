"""PostgreSQL facts pgws has to respect: how long a name may be, how big a NOTIFY payload.

Defaults of a standard build; they sit here, away from any setting, so the modules that check
them (config, claims, envelope) need not import each other.
"""

# PostgreSQL truncates identifiers to NAMEDATALEN - 1 bytes: a longer LISTEN channel would silently
# differ from the pg_notify() channel, so such names are refused up front.
MAX_CHANNEL_BYTES = 63
# NOTIFY payloads must be shorter than 8000 bytes in the default PostgreSQL build.
NOTIFY_PAYLOAD_LIMIT = 7999
# What pgws.store_many() takes per durable message (SPEC 7: frames up to 16 MiB in durable mode).
DURABLE_PAYLOAD_LIMIT = 16 * 1024 * 1024
