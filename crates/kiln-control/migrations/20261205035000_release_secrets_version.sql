-- The version of the environment's secret set each release was made with (0 before any
-- secret). An instance gets the secrets of that version, and an agent caches them by it.
-- Existing releases get it from the secret events before their `ReleaseCreated`.
ALTER TABLE releases ADD COLUMN secrets_version bigint NOT NULL DEFAULT 0;

UPDATE releases r SET secrets_version = coalesce((
    SELECT max((s.payload->'data'->>'secrets_version')::bigint)
    FROM events s
    WHERE s.stream = 'env:env_' || replace(r.env_id::text, '-', '')
      AND s.type IN ('SecretSet', 'SecretUnset')
      AND s.seq < (SELECT min(c.seq) FROM events c
                   WHERE c.stream = s.stream AND c.type = 'ReleaseCreated'
                     AND c.payload->'data'->'release'->>'id'
                         = 'rel_' || replace(r.id::text, '-', ''))
), 0);
