-- A fenced append in one statement: the leader's term check and `kiln_append` together, so an
-- orchestrator write of one stream (a step record, a deploy's end, the env's release) costs
-- one round trip instead of four (BEGIN, the check, the append, COMMIT).
--
-- The check share-locks the term's row, as `leader::check_fence` does, so no new term can be
-- written until the append commits. A stale term raises SQLSTATE KL004 with the current term
-- in DETAIL, and nothing is written.

CREATE FUNCTION kiln_append_fenced(
    leadership text,
    fence bigint,
    stream text,
    expected text,
    expected_version bigint,
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
    current bigint;
BEGIN
    SELECT term INTO current FROM leader_terms WHERE name = leadership FOR SHARE;
    IF coalesce(current, 0) <> fence THEN
        RAISE EXCEPTION 'leadership term % is stale', fence
            USING ERRCODE = 'KL004', DETAIL = coalesce(current, 0)::text;
    END IF;
    RETURN QUERY
    SELECT * FROM kiln_append(stream, expected, expected_version, actor, event_time, org_ids,
                              env_ids, host_ids, types, payloads);
END
$$;
