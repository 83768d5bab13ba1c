"""Settings of durable channels (SPEC 7): which channels, the schema, retention, replay.

Declared here, collected with the others in `config.SETTINGS`; messages are kept in the
database's `pgws` schema (`db/durable.py`).
"""

from __future__ import annotations

from pgws.parsers import Integer, Seconds, boolean, channel_set
from pgws.setting import Setting

# Durable channels (SPEC 7): messages kept in the database's `pgws` schema.
DURABLE = Setting(
    name="PGWS_DURABLE",
    parse=channel_set,
    default="false",
    help="durable channels: true (all), false (none), or a comma-separated list, prefix* for a"
    " family",
)
DURABLE_MIGRATE = Setting(
    name="PGWS_DURABLE_MIGRATE",
    parse=boolean,
    default="true",
    help="create or upgrade the pgws schema at start-up; false = it must exist (pgws migrate)",
)
DURABLE_RETENTION = Setting(
    name="PGWS_DURABLE_RETENTION",
    parse=Seconds(0, 10 * 365 * 86400),
    default="86400",
    help="seconds durable messages are kept (and resumable)",
)
DURABLE_REPLAY_MAX = Setting(
    name="PGWS_DURABLE_REPLAY_MAX",
    parse=Integer(0, 1_000_000),
    default="1000",
    help="most messages a resume may replay; further behind is `not recovered`",
)
