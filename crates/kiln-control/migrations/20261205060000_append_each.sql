-- Appending events of many streams in one statement: an agent's batch of state reports (one
-- stream per instance) and an orchestrator step that places or stops many instances. One call
-- replaces one `kiln_append` round trip per event.
--
-- Event i goes to `event_streams[i]` and is checked against `expected[i]` (`any`, `no_stream`
-- or `exact` with `expected_versions[i]`) after the batch's earlier events are counted, so a
-- stream named twice is bumped twice. A stream at another version raises SQLSTATE KL003 with
-- the stream in DETAIL and its version in HINT, and the whole statement writes nothing.
--
-- The stream rows of a batch are locked in id order first. Two batches that name the same
-- streams in different orders (the orchestrator stopping instances that their agent is
-- reporting on) would otherwise deadlock. The append lock comes after every row lock, as in
-- `kiln_append`, and is held until commit, so `seq` order stays commit order. A caller must
-- not append again in the same transaction after this call.

CREATE FUNCTION kiln_append_each(
    event_streams text[],
    expected text[],
    expected_versions bigint[],
    actor text,
    event_time timestamptz,
    org_ids uuid[],
    env_ids uuid[],
    host_ids uuid[],
    types text[],
    payloads jsonb[]
) RETURNS TABLE (seq bigint, stream_version bigint)
LANGUAGE plpgsql AS $$
DECLARE
    versions bigint[] := ARRAY[]::bigint[];
    bumped bigint;
    item record;
BEGIN
    IF cardinality(event_streams) > 1 THEN
        PERFORM 1 FROM streams WHERE id = ANY(event_streams) ORDER BY id FOR UPDATE;
    END IF;

    -- A cursor over the arrays, not `payloads[i]`: subscripting an array of variable-length
    -- values walks it from the start, which made a batch cost quadratic time.
    FOR item IN
        SELECT new.stream, new.kind, new.version, new.payload
        FROM unnest(event_streams, expected, expected_versions, payloads)
             WITH ORDINALITY AS new(stream, kind, version, payload, position)
        ORDER BY new.position
    LOOP
        bumped := NULL;
        CASE item.kind
        WHEN 'any' THEN
            UPDATE streams SET version = streams.version + 1 WHERE id = item.stream
            RETURNING version INTO bumped;
            IF bumped IS NULL THEN
                INSERT INTO streams AS s (id, version) VALUES (item.stream, 1)
                ON CONFLICT (id) DO UPDATE SET version = s.version + 1
                RETURNING version INTO bumped;
            END IF;
        WHEN 'no_stream' THEN
            INSERT INTO streams (id, version) VALUES (item.stream, 1)
            ON CONFLICT (id) DO NOTHING
            RETURNING version INTO bumped;
        WHEN 'exact' THEN
            UPDATE streams SET version = streams.version + 1
            WHERE id = item.stream AND version = item.version
            RETURNING version INTO bumped;
        ELSE
            RAISE EXCEPTION 'invalid expected version kind %', item.kind
                USING ERRCODE = 'KL002';
        END CASE;

        IF bumped IS NULL THEN
            RAISE EXCEPTION 'stream % is not at the expected version', item.stream
                USING ERRCODE = 'KL003',
                      DETAIL = item.stream,
                      HINT = coalesce(
                          (SELECT version FROM streams WHERE id = item.stream), 0)::text;
        END IF;
        versions := versions || bumped;
        PERFORM kiln_project(item.payload, event_time);
    END LOOP;

    PERFORM pg_advisory_xact_lock(118100534886401);
    PERFORM pg_notify('kiln_events', '');
    RETURN QUERY
    INSERT INTO events AS e
        (stream, stream_version, org_id, env_id, host_id, type, payload, actor, time)
    SELECT new.stream, new.version, new.org_id, new.env_id, new.host_id, new.type,
           new.payload, actor, event_time
    FROM unnest(event_streams, versions, org_ids, env_ids, host_ids, types, payloads)
         WITH ORDINALITY AS new(stream, version, org_id, env_id, host_id, type, payload, position)
    ORDER BY new.position
    RETURNING e.seq, e.stream_version;
END
$$;
