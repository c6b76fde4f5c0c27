-- Inserting an append's events at commit time, so the append lock is held only inside the
-- server and never across a round trip to the client.
--
-- `Store::append` stages its events as JSON in the transaction-local setting
-- `kiln.pending_events`, in the same statement that bumps the stream row. The deferred trigger
-- below fires at COMMIT for that row: it takes the append lock (the same key as
-- `store::APPEND_LOCK_KEY`), queues the notification and inserts the staged events, drawing
-- `seq`. The lock is released when the commit finishes, so `seq` order stays commit order.
-- Appends made with `Store::append_in` stage nothing, and the trigger returns at once.

CREATE FUNCTION kiln_insert_pending_events() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    pending jsonb := nullif(current_setting('kiln.pending_events', true), '')::jsonb;
BEGIN
    IF pending IS NULL OR pending->>'stream' IS DISTINCT FROM NEW.id THEN
        RETURN NULL;
    END IF;
    PERFORM set_config('kiln.pending_events', '', true);
    PERFORM pg_advisory_xact_lock(118100534886401);
    PERFORM pg_notify('kiln_events', '');
    INSERT INTO events
        (stream, stream_version, org_id, env_id, host_id, type, payload, actor, time)
    SELECT NEW.id,
           NEW.version - jsonb_array_length(pending->'events') + e.position,
           e.org_id, e.env_id, e.host_id, e.type, e.payload,
           pending->>'actor', (pending->>'time')::timestamptz
    FROM ROWS FROM (
             jsonb_to_recordset(pending->'events')
                 AS (org_id uuid, env_id uuid, host_id uuid, type text, payload jsonb)
         ) WITH ORDINALITY AS e(org_id, env_id, host_id, type, payload, position)
    ORDER BY e.position;
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER streams_insert_pending_events
    AFTER INSERT OR UPDATE ON streams
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION kiln_insert_pending_events();
