"""Files pgws itself serves from its package: `/pgws-client.js`, the browser client (SPEC 10).

The script ships in the wheel (pgws/static/, linked to clients/js/ in the repository) and is read
once, on the first request. It is served with an ETag and `Cache-Control: no-cache`: browsers keep
a copy but ask each time whether it is still current (a 304 costs a few bytes), so an upgraded
pgws never leaves pages on an old client. Any origin may load it (it is public code, sent without
credentials), so pages on another host can `import` it as a module.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources

from pgws import __version__

CLIENT_PATH = "/pgws-client.js"
CONTENT_TYPE = "text/javascript; charset=utf-8"
CACHE_CONTROL = "no-cache"


@functools.cache
def client_script() -> tuple[bytes, str]:
    """The client's bytes and their ETag (the pgws version and a digest of the content)."""
    body = resources.files("pgws").joinpath("static", "pgws-client.js").read_bytes()
    digest = hashlib.sha256(body).hexdigest()[:16]
    return body, f'"{__version__}-{digest}"'


def not_modified(if_none_match: str | None, etag: str) -> bool:
    """Whether an If-None-Match header names `etag` (or `*`): the client's copy is current."""
    if if_none_match is None:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags
