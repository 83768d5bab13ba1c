"""Operators' settings: logging, where /metrics is served, which proxies name the client.

Declared here, collected with the others in `config.SETTINGS`.
"""

from __future__ import annotations

from pgws.parsers import Choice, boolean
from pgws.places import metrics_place
from pgws.proxies import proxy_networks
from pgws.setting import Setting

# No "critical" or "off": errors are never silenced.
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_LEVEL = Setting(
    name="PGWS_LOG_LEVEL",
    parse=Choice(LOG_LEVELS),
    default="info",
    help="debug, info, warning or error; warning silences the per-socket lines"
    " (errors always show)",
)
DEBUG = Setting(
    name="PGWS_DEBUG",
    parse=boolean,
    default="false",
    help="on an internal error, print its traceback (it may show the database URI or secret)",
)
# Operators' settings (issue 13 items 4, 5): who may name the client, where /metrics is served.
TRUSTED_PROXIES = Setting(
    name="PGWS_TRUSTED_PROXIES",
    parse=proxy_networks,
    help="comma-separated proxy addresses/CIDRs whose X-Forwarded-For/Forwarded give the client"
    " address (unset = trust nobody)",
)
METRICS = Setting(
    name="PGWS_METRICS",
    parse=metrics_place,
    default="on",
    help="on: /metrics on the main port; off: no /metrics; host:port: a separate listener"
    " serving only /metrics",
)
