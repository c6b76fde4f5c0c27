-- Appending in one statement: the stream check, the projections and the event insert run
-- inside the server, so an append costs one round trip and every statement keeps a cached
-- plan.
--
-- `kiln_project` is the only definition of the projections. Live appends (`kiln_append`) and
-- `projections rebuild` both call it. Its table names are unqualified on purpose: a rebuild
-- points `search_path` at a scratch schema and replays into it. PostgreSQL replans a cached
-- plan when `search_path` differs from the one it was planned with. Helpers are called
-- schema-qualified because the scratch `search_path` does not contain `public`.
--
-- Event payloads are the JSON of `kiln_api::Event` (`{"type": ..., "data": {...}}`). Typed ids
-- are serialized as `<prefix>_<32 hex digits>`, and `kiln_id` reads the UUID from the last 32
-- characters.
--
-- `kiln_append` replaces the commit-time insert of migration `append_at_commit`: it takes the
-- append lock (the same key as `store::APPEND_LOCK_KEY`) just before it draws `seq` and holds
-- it until its transaction commits, so `seq` order stays commit order.

DROP TRIGGER streams_insert_pending_events ON streams;
DROP FUNCTION kiln_insert_pending_events();

CREATE FUNCTION kiln_id(id text) RETURNS uuid
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN right(id, 32)::uuid;

-- Reads an RFC 3339 timestamp, dropping digits below microseconds instead of rounding them,
-- as sqlx does when it binds an `OffsetDateTime`.
CREATE FUNCTION kiln_time(value text) RETURNS timestamptz
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN regexp_replace(value, '(\.[0-9]{6})[0-9]+', '\1')::timestamptz;

CREATE FUNCTION kiln_project(event jsonb, event_time timestamptz) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    d jsonb := event->'data';
BEGIN
    CASE event->>'type'
    WHEN 'OrgCreated' THEN
        INSERT INTO orgs (id, name, created_at)
        VALUES (public.kiln_id(d->>'org_id'), d->>'name', event_time);

    WHEN 'TokenCreated' THEN
        INSERT INTO tokens (id, kind, org_id, host_id, name, created_at, expires_at)
        VALUES (public.kiln_id(d->>'token_id'), d->>'kind', public.kiln_id(d->>'org_id'),
                public.kiln_id(d->>'host_id'), d->>'name', event_time,
                public.kiln_time(d->>'expires_at'));

    WHEN 'TokenRevoked' THEN
        UPDATE tokens SET revoked_at = event_time
        WHERE id = public.kiln_id(d->>'token_id') AND revoked_at IS NULL;

    WHEN 'AppCreated' THEN
        INSERT INTO apps (id, org_id, name, created_at)
        VALUES (public.kiln_id(d->>'app_id'), public.kiln_id(d->>'org_id'), d->>'name',
                event_time);

    WHEN 'AppDeleted' THEN
        DELETE FROM apps WHERE id = public.kiln_id(d->>'app_id');

    WHEN 'EnvCreated' THEN
        INSERT INTO envs (id, org_id, app_id, name, hostname, ipv6_address, scale,
                          config_version, secrets_version, release_count, created_at)
        VALUES (public.kiln_id(d->>'env_id'), public.kiln_id(d->>'org_id'),
                public.kiln_id(d->>'app_id'), d->>'name', d->>'hostname', d->>'ipv6_address',
                '{}', 0, 0, 0, event_time);
        INSERT INTO addresses (address, env_id, kind, instance_id)
        VALUES (d->>'ipv6_address', public.kiln_id(d->>'env_id'), 'dedicated', NULL);

    WHEN 'EnvDeleted' THEN
        DELETE FROM config_vars WHERE env_id = public.kiln_id(d->>'env_id');
        DELETE FROM secrets WHERE env_id = public.kiln_id(d->>'env_id');
        DELETE FROM routes WHERE env_id = public.kiln_id(d->>'env_id');
        DELETE FROM addresses WHERE env_id = public.kiln_id(d->>'env_id');
        DELETE FROM envs WHERE id = public.kiln_id(d->>'env_id');

    WHEN 'EnvScaled' THEN
        UPDATE envs SET scale = scale || (d->'counts') WHERE id = public.kiln_id(d->>'env_id');

    WHEN 'ConfigChanged' THEN
        -- A name in both `set` and `unset` ends up set, as if `unset` ran first.
        DELETE FROM config_vars
        WHERE env_id = public.kiln_id(d->>'env_id')
          AND name IN (SELECT jsonb_array_elements_text(d->'unset'))
          AND NOT (d->'set') ? name;
        INSERT INTO config_vars (env_id, name, value)
        SELECT public.kiln_id(d->>'env_id'), var.key, var.value
        FROM jsonb_each_text(d->'set') AS var
        ON CONFLICT (env_id, name) DO UPDATE SET value = EXCLUDED.value;
        UPDATE envs SET config_version = (d->>'version')::bigint
        WHERE id = public.kiln_id(d->>'env_id');

    WHEN 'SecretSet' THEN
        INSERT INTO secrets (env_id, name, version, digest, updated_at)
        VALUES (public.kiln_id(d->>'env_id'), d->>'name', (d->>'version')::bigint,
                d->>'digest', event_time)
        ON CONFLICT (env_id, name) DO UPDATE
        SET version = EXCLUDED.version, digest = EXCLUDED.digest,
            updated_at = EXCLUDED.updated_at;
        UPDATE envs SET secrets_version = (d->>'secrets_version')::bigint
        WHERE id = public.kiln_id(d->>'env_id');

    WHEN 'SecretUnset' THEN
        DELETE FROM secrets WHERE env_id = public.kiln_id(d->>'env_id') AND name = d->>'name';
        UPDATE envs SET secrets_version = (d->>'secrets_version')::bigint
        WHERE id = public.kiln_id(d->>'env_id');

    WHEN 'ReleaseCreated' THEN
        -- `secrets_version` is added by migration `release_secrets_version`: the env's
        -- secret-set version when the release is made, which its instances get.
        INSERT INTO releases (id, env_id, version, image_ref, image_digest, spec,
                              config_version, rollback_of, description, created_at,
                              secrets_version)
        VALUES (public.kiln_id(d->'release'->>'id'), public.kiln_id(d->'release'->>'env_id'),
                (d->'release'->>'version')::bigint, d->'release'->'image'->>'reference',
                d->'release'->'image'->>'digest', d->'release'->'spec',
                (d->'release'->>'config_version')::bigint,
                public.kiln_id(d->'release'->>'rollback_of'),
                coalesce(d->'release'->>'description', ''), event_time,
                (SELECT secrets_version FROM envs
                 WHERE id = public.kiln_id(d->'release'->>'env_id')));
        UPDATE envs SET release_count = GREATEST(release_count, (d->'release'->>'version')::bigint)
        WHERE id = public.kiln_id(d->'release'->>'env_id');

    WHEN 'DeployRequested' THEN
        INSERT INTO deploys (id, env_id, release_id, previous_release_id, strategy, state,
                             created_at, updated_at)
        VALUES (public.kiln_id(d->>'deploy_id'), public.kiln_id(d->>'env_id'),
                public.kiln_id(d->>'release_id'), public.kiln_id(d->>'previous_release_id'),
                d->>'strategy', 'pending', event_time, event_time);

    WHEN 'DeployStateChanged' THEN
        UPDATE deploys SET state = d->>'state', failure = d->>'failure', updated_at = event_time
        WHERE id = public.kiln_id(d->>'deploy_id');

    WHEN 'DeployStepCompleted' THEN
        INSERT INTO deploy_steps (deploy_id, position, step, detail, time)
        SELECT public.kiln_id(d->>'deploy_id'), COALESCE(max(position), 0) + 1, d->>'step',
               d->>'detail', event_time
        FROM deploy_steps WHERE deploy_id = public.kiln_id(d->>'deploy_id');

    WHEN 'EnvReleaseChanged' THEN
        UPDATE envs SET current_release_id = public.kiln_id(d->>'release_id')
        WHERE id = public.kiln_id(d->>'env_id');

    WHEN 'InstancePlaced' THEN
        INSERT INTO instances (id, env_id, release_id, process, host_id, ipv6, ipv4, desired,
                               state, created_at, updated_at)
        VALUES (public.kiln_id(d->>'instance_id'), public.kiln_id(d->>'env_id'),
                public.kiln_id(d->>'release_id'), d->>'process', public.kiln_id(d->>'host_id'),
                d->>'ipv6', d->>'ipv4', 'running', 'pending', event_time, event_time);
        INSERT INTO addresses (address, env_id, kind, instance_id)
        VALUES (d->>'ipv6', public.kiln_id(d->>'env_id'), 'instance_ipv6',
                public.kiln_id(d->>'instance_id'));
        INSERT INTO addresses (address, env_id, kind, instance_id)
        VALUES (d->>'ipv4', public.kiln_id(d->>'env_id'), 'instance_ipv4',
                public.kiln_id(d->>'instance_id'));

    WHEN 'InstanceStateChanged' THEN
        UPDATE instances SET state = d->>'state', detail = d->>'detail', updated_at = event_time
        WHERE id = public.kiln_id(d->>'instance_id');

    WHEN 'InstanceStopRequested' THEN
        UPDATE instances SET desired = 'stopped', updated_at = event_time
        WHERE id = public.kiln_id(d->>'instance_id');

    WHEN 'InstanceRemoved' THEN
        DELETE FROM addresses WHERE instance_id = public.kiln_id(d->>'instance_id');
        DELETE FROM instances WHERE id = public.kiln_id(d->>'instance_id');

    WHEN 'RoutesChanged' THEN
        DELETE FROM routes WHERE env_id = public.kiln_id(d->>'env_id');
        INSERT INTO routes (env_id, position, service, matcher, protocol, proxy_protocol,
                            backends)
        SELECT public.kiln_id(d->>'env_id'), (route.position - 1)::int,
               route.value->>'service', route.value->'matcher', route.value->>'protocol',
               (route.value->>'proxy_protocol')::boolean, route.value->'backends'
        FROM jsonb_array_elements(d->'routes') WITH ORDINALITY AS route(value, position);

    WHEN 'HostCreated' THEN
        INSERT INTO hosts (id, name, state, created_at)
        VALUES (public.kiln_id(d->>'host_id'), d->>'name', 'pending', event_time);

    WHEN 'HostRegistered' THEN
        -- Registration makes a pending or lost host ready; a cordoned or draining host stays
        -- so across agent restarts.
        UPDATE hosts
        SET vcpus = (d->'capacity'->>'vcpus')::int,
            memory_mib = (d->'capacity'->>'memory_mib')::bigint,
            driver = d->>'driver',
            overlay_public_key = d->>'overlay_public_key',
            overlay_endpoint = d->>'overlay_endpoint',
            ipv6_prefix = d->>'ipv6_prefix',
            state = CASE WHEN state IN ('pending', 'lost') THEN 'ready' ELSE state END
        WHERE id = public.kiln_id(d->>'host_id');

    WHEN 'HostCordoned' THEN
        UPDATE hosts SET state = 'cordoned' WHERE id = public.kiln_id(d->>'host_id');

    WHEN 'HostUncordoned' THEN
        UPDATE hosts SET state = 'ready' WHERE id = public.kiln_id(d->>'host_id');

    WHEN 'HostDrainRequested' THEN
        UPDATE hosts SET state = 'draining' WHERE id = public.kiln_id(d->>'host_id');

    WHEN 'HostLost' THEN
        UPDATE hosts SET state = 'lost' WHERE id = public.kiln_id(d->>'host_id');

    WHEN 'Ipv4AddressAllocated' THEN
        INSERT INTO addresses (address, env_id, kind, instance_id, pool)
        VALUES (d->>'address', public.kiln_id(d->>'env_id'), 'dedicated_ipv4', NULL,
                d->>'pool');

    WHEN 'Ipv4AddressReleased' THEN
        DELETE FROM addresses WHERE address = d->>'address' AND kind = 'dedicated_ipv4';

    ELSE
        RAISE EXCEPTION 'no projection for event type %', event->>'type'
            USING ERRCODE = 'KL001';
    END CASE;
END
$$;

-- Appends events to one stream. `expected` is `any`, `no_stream` or `exact` (then
-- `expected_version` is the version the stream must be at). Returns the `seq` and stream
-- version of each event in order. When the stream is not at the expected version, nothing is
-- written and one row comes back with a NULL `seq` and the stream's actual version.
CREATE FUNCTION kiln_append(
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
    event_count bigint := cardinality(payloads);
    bumped bigint;
    payload jsonb;
BEGIN
    CASE expected
    WHEN 'any' THEN
        -- An UPDATE first, because the upsert's speculative insert costs more and nearly
        -- every append goes to an existing stream.
        UPDATE streams SET version = streams.version + event_count WHERE id = stream
        RETURNING version INTO bumped;
        IF bumped IS NULL THEN
            INSERT INTO streams AS s (id, version) VALUES (stream, event_count)
            ON CONFLICT (id) DO UPDATE SET version = s.version + event_count
            RETURNING version INTO bumped;
        END IF;
    WHEN 'no_stream' THEN
        INSERT INTO streams (id, version) VALUES (stream, event_count)
        ON CONFLICT (id) DO NOTHING
        RETURNING version INTO bumped;
    WHEN 'exact' THEN
        UPDATE streams SET version = streams.version + event_count
        WHERE id = stream AND version = expected_version
        RETURNING version INTO bumped;
    ELSE
        RAISE EXCEPTION 'invalid expected version kind %', expected USING ERRCODE = 'KL002';
    END CASE;

    IF bumped IS NULL THEN
        RETURN QUERY
        SELECT NULL::bigint, coalesce((SELECT version FROM streams WHERE id = stream), 0);
        RETURN;
    END IF;

    FOREACH payload IN ARRAY payloads LOOP
        PERFORM kiln_project(payload, event_time);
    END LOOP;

    PERFORM pg_advisory_xact_lock(118100534886401);
    PERFORM pg_notify('kiln_events', '');
    RETURN QUERY
    INSERT INTO events AS e
        (stream, stream_version, org_id, env_id, host_id, type, payload, actor, time)
    SELECT stream, bumped - event_count + new.position, new.org_id, new.env_id, new.host_id,
           new.type, new.payload, actor, event_time
    FROM unnest(org_ids, env_ids, host_ids, types, payloads)
         WITH ORDINALITY AS new(org_id, env_id, host_id, type, payload, position)
    ORDER BY new.position
    RETURNING e.seq, e.stream_version;
END
$$;
