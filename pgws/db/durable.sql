-- pgws durable channels, schema version 1 (SPEC 7).
--
-- Every statement is idempotent, so this script can be applied again; pgws migrate runs it in one
-- transaction after pg_advisory_xact_lock, so that several processes starting together wait for
-- the first one instead of racing on CREATE.

CREATE SCHEMA IF NOT EXISTS pgws;

CREATE TABLE IF NOT EXISTS pgws.schema_version (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- One row per channel that ever had a durable message. `top` is the last offset given out: every
-- send takes `top = top + n` on this row, and the row lock held until commit makes the channel's
-- offsets become visible in order (a bigserial would commit out of order). `epoch` is random and
-- new whenever the row is created again, so positions from a reset history are not resumed.
CREATE TABLE IF NOT EXISTS pgws.channel (
    name text PRIMARY KEY,
    epoch text NOT NULL,
    top bigint NOT NULL
);

-- One row per message, deleted in short batches once older than the retention (pgws prune).
-- `tag` is random per row: the same offset given out twice (after a failover to an asynchronous
-- replica) carries another tag, and a position naming the lost one is not resumed.
CREATE TABLE IF NOT EXISTS pgws.message (
    channel text NOT NULL REFERENCES pgws.channel (name) ON DELETE CASCADE,
    "offset" bigint NOT NULL,
    tag text NOT NULL,
    payload text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (channel, "offset")
);

CREATE INDEX IF NOT EXISTS message_created_at ON pgws.message (created_at);

-- Vacuum must not cut empty pages off the table's end: that takes an ACCESS EXCLUSIVE lock, which
-- producers' inserts wait on (bench/retention.py saw it under prune churn); the pages are reused.
ALTER TABLE pgws.message SET (vacuum_truncate = false);

-- The notification channel that wakes pgws readers up; the payload is the message's channel.
CREATE OR REPLACE FUNCTION pgws.wake_channel() RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN 'pgws.wake';

-- Eight hex digits of randomness: epochs and tags.
CREATE OR REPLACE FUNCTION pgws.random_hex8() RETURNS text
LANGUAGE sql VOLATILE PARALLEL SAFE
RETURN left(md5(gen_random_uuid()::text), 8);

-- Eight hex digits naming the channel in its positions, so that a position from another channel is
-- told apart from one of a reset history.
CREATE OR REPLACE FUNCTION pgws.channel_hash(channel text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
RETURN left(md5(channel), 8);

-- Why `channel` cannot be a pgws channel, or NULL: the rules pgws applies to socket channels.
CREATE OR REPLACE FUNCTION pgws.channel_problem(channel text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE
    WHEN channel IS NULL THEN 'channel must not be NULL'
    WHEN channel = '' THEN 'channel must not be empty'
    WHEN octet_length(channel) > 63 THEN 'channel names are at most 63 bytes'
    WHEN channel ~ '[\u0001-\u001f\u007f-\u009f]' THEN 'control characters in the channel name'
    WHEN channel ~ '[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]'
        THEN 'bidi control characters in the channel name'
END;

-- Store payloads on a channel in order and return their positions, without a wake-up. pgws's own
-- writer calls this, then sends the wake-ups in a NOTIFY-only transaction of their own.
CREATE OR REPLACE FUNCTION pgws.store_many(channel text, payloads text[]) RETURNS text[]
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    problem text := pgws.channel_problem(store_many.channel);
    n integer := cardinality(store_many.payloads);
    last_offset bigint;
    channel_epoch text;
    positions text[];
BEGIN
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION 'pgws: %', problem USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF store_many.payloads IS NULL THEN
        RAISE EXCEPTION 'pgws: payloads must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF array_position(store_many.payloads, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'pgws: payload must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF EXISTS (SELECT FROM unnest(store_many.payloads) AS p WHERE octet_length(p) > 16777216) THEN
        RAISE EXCEPTION 'pgws: payloads are at most 16 MiB' USING ERRCODE = 'program_limit_exceeded';
    END IF;
    IF n = 0 THEN
        RETURN '{}';
    END IF;
    -- The row lock taken here orders the channel until commit.
    UPDATE pgws.channel AS c SET top = c.top + n WHERE c.name = store_many.channel
        RETURNING c.top, c.epoch INTO last_offset, channel_epoch;
    IF NOT FOUND THEN
        INSERT INTO pgws.channel AS c (name, epoch, top)
            VALUES (store_many.channel, pgws.random_hex8(), n)
            ON CONFLICT (name) DO UPDATE SET top = c.top + n
            RETURNING c.top, c.epoch INTO last_offset, channel_epoch;
    END IF;
    WITH stored AS (
        INSERT INTO pgws.message (channel, "offset", tag, payload)
        SELECT store_many.channel, last_offset - n + u.i, pgws.random_hex8(), u.p
        FROM unnest(store_many.payloads) WITH ORDINALITY AS u(p, i)
        RETURNING "offset", tag
    )
    SELECT array_agg(
        pgws.channel_hash(store_many.channel) || ':' || channel_epoch || ':' || s."offset"
        || ':' || s.tag ORDER BY s."offset")
    INTO positions FROM stored AS s;
    RETURN positions;
END
$$;

-- SQL producers: store in order, return the positions, and wake the readers up at commit. The
-- wake-up is a NOTIFY in the producer's transaction (the only way a function can send one);
-- identical notifications in one transaction are folded into one by PostgreSQL.
CREATE OR REPLACE FUNCTION pgws.send_many(channel text, payloads text[]) RETURNS text[]
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    positions text[] := pgws.store_many(send_many.channel, send_many.payloads);
BEGIN
    IF cardinality(positions) > 0 THEN
        PERFORM pg_notify(pgws.wake_channel(), send_many.channel);
    END IF;
    RETURN positions;
END
$$;

CREATE OR REPLACE FUNCTION pgws.send(channel text, payload text) RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF send.payload IS NULL THEN
        RAISE EXCEPTION 'pgws: payload must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    RETURN (pgws.send_many(send.channel, ARRAY[send.payload]))[1];
END
$$;

-- The functions run with their owner's rights (SECURITY DEFINER, with a fixed search_path), so a
-- producer needs no rights on the tables: GRANT USAGE ON SCHEMA pgws and EXECUTE on these.
REVOKE ALL ON FUNCTION pgws.store_many(text, text[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgws.send_many(text, text[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgws.send(text, text) FROM PUBLIC;

INSERT INTO pgws.schema_version (version) VALUES (1) ON CONFLICT (version) DO NOTHING;
