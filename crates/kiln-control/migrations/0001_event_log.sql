-- The event log, its streams and every projection of it.
--
-- Projection tables are written only by projections.rs, from events, inside the append's
-- transaction. Tables marked "state" hold data that is not derived from events (credentials,
-- ciphertexts, leases, idempotency records, logs) and are not part of a rebuild.

CREATE TABLE events (
    seq            bigserial PRIMARY KEY,
    stream         text        NOT NULL,
    stream_version bigint      NOT NULL,
    org_id         uuid,
    env_id         uuid,
    host_id        uuid,
    type           text        NOT NULL,
    payload        jsonb       NOT NULL,
    actor          text        NOT NULL,
    time           timestamptz NOT NULL,
    UNIQUE (stream, stream_version)
);
CREATE INDEX events_org_seq ON events (org_id, seq);
CREATE INDEX events_host_seq ON events (host_id, seq);

CREATE TABLE streams (
    id      text PRIMARY KEY,
    version bigint NOT NULL
);

-- state: cluster-wide settings chosen at bootstrap.
CREATE TABLE cluster_settings (
    key   text PRIMARY KEY,
    value text NOT NULL
);

-- projections
CREATE TABLE orgs (
    id         uuid PRIMARY KEY,
    name       text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL
);

CREATE TABLE tokens (
    id         uuid PRIMARY KEY,
    kind       text NOT NULL,
    org_id     uuid,
    host_id    uuid,
    name       text NOT NULL,
    created_at timestamptz NOT NULL,
    expires_at timestamptz,
    revoked_at timestamptz
);
CREATE INDEX tokens_org ON tokens (org_id);

CREATE TABLE apps (
    id         uuid PRIMARY KEY,
    org_id     uuid NOT NULL,
    name       text NOT NULL,
    created_at timestamptz NOT NULL,
    CONSTRAINT apps_org_name UNIQUE (org_id, name)
);

CREATE TABLE envs (
    id                 uuid PRIMARY KEY,
    org_id             uuid NOT NULL,
    app_id             uuid NOT NULL,
    name               text NOT NULL,
    hostname           text NOT NULL,
    ipv6_address       text NOT NULL,
    current_release_id uuid,
    scale              jsonb NOT NULL,
    config_version     bigint NOT NULL,
    secrets_version    bigint NOT NULL,
    release_count      bigint NOT NULL,
    created_at         timestamptz NOT NULL,
    CONSTRAINT envs_app_name UNIQUE (app_id, name),
    CONSTRAINT envs_hostname UNIQUE (hostname),
    CONSTRAINT envs_ipv6_address UNIQUE (ipv6_address)
);

CREATE TABLE config_vars (
    env_id uuid NOT NULL,
    name   text NOT NULL,
    value  text NOT NULL,
    PRIMARY KEY (env_id, name)
);

CREATE TABLE secrets (
    env_id     uuid NOT NULL,
    name       text NOT NULL,
    version    bigint NOT NULL,
    digest     text NOT NULL,
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (env_id, name)
);

CREATE TABLE releases (
    id             uuid PRIMARY KEY,
    env_id         uuid NOT NULL,
    version        bigint NOT NULL,
    image_ref      text NOT NULL,
    image_digest   text NOT NULL,
    spec           jsonb NOT NULL,
    config_version bigint NOT NULL,
    rollback_of    uuid,
    description    text NOT NULL,
    created_at     timestamptz NOT NULL,
    CONSTRAINT releases_env_version UNIQUE (env_id, version)
);

CREATE TABLE deploys (
    id                  uuid PRIMARY KEY,
    env_id              uuid NOT NULL,
    release_id          uuid NOT NULL,
    previous_release_id uuid,
    strategy            text NOT NULL,
    state               text NOT NULL,
    failure             text,
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL
);
CREATE INDEX deploys_env ON deploys (env_id, created_at);

CREATE TABLE deploy_steps (
    deploy_id uuid NOT NULL,
    position  int NOT NULL,
    step      text NOT NULL,
    detail    text NOT NULL,
    time      timestamptz NOT NULL,
    PRIMARY KEY (deploy_id, position)
);

CREATE TABLE hosts (
    id                 uuid PRIMARY KEY,
    name               text NOT NULL UNIQUE,
    state              text NOT NULL,
    vcpus              int,
    memory_mib         bigint,
    driver             text,
    overlay_public_key text,
    overlay_endpoint   text,
    ipv6_prefix        text UNIQUE,
    created_at         timestamptz NOT NULL
);

CREATE TABLE instances (
    id         uuid PRIMARY KEY,
    env_id     uuid NOT NULL,
    release_id uuid NOT NULL,
    process    text NOT NULL,
    host_id    uuid NOT NULL,
    ipv6       text NOT NULL,
    ipv4       text NOT NULL,
    desired    text NOT NULL,
    state      text NOT NULL,
    detail     text,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);
CREATE INDEX instances_env ON instances (env_id);
CREATE INDEX instances_host ON instances (host_id);

CREATE TABLE routes (
    env_id         uuid NOT NULL,
    position       int NOT NULL,
    service        text NOT NULL,
    matcher        jsonb NOT NULL,
    protocol       text NOT NULL,
    proxy_protocol boolean NOT NULL,
    backends       jsonb NOT NULL,
    PRIMARY KEY (env_id, position)
);

CREATE TABLE addresses (
    address     text PRIMARY KEY,
    env_id      uuid NOT NULL,
    kind        text NOT NULL,
    instance_id uuid
);
CREATE INDEX addresses_env ON addresses (env_id);

-- state: token credentials (SHA-256 of the 32 random bytes).
CREATE TABLE token_hashes (
    token_id uuid PRIMARY KEY,
    hash     bytea NOT NULL
);

-- state: secret ciphertexts, one row per version that is current.
CREATE TABLE secret_values (
    env_id     uuid NOT NULL,
    name       text NOT NULL,
    version    bigint NOT NULL,
    key_id     text NOT NULL,
    nonce      bytea NOT NULL,
    ciphertext bytea NOT NULL,
    PRIMARY KEY (env_id, name)
);

-- state: per-environment key of the secret digests.
CREATE TABLE secret_digest_keys (
    env_id uuid PRIMARY KEY,
    key    bytea NOT NULL
);

-- state: host leases, renewed by heartbeats.
CREATE TABLE host_leases (
    host_id    uuid PRIMARY KEY,
    expires_at timestamptz NOT NULL,
    running    int NOT NULL
);

-- state: idempotency records of mutating requests.
CREATE TABLE idempotency_keys (
    token_id     uuid NOT NULL,
    key          text NOT NULL,
    request_hash bytea NOT NULL,
    status       int,
    body         bytea,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (token_id, key)
);

-- state: the recent log window of each environment.
CREATE TABLE log_lines (
    id          bigserial PRIMARY KEY,
    env_id      uuid NOT NULL,
    instance_id uuid NOT NULL,
    process     text NOT NULL,
    stream      text NOT NULL,
    time        timestamptz NOT NULL,
    line        text NOT NULL
);
CREATE INDEX log_lines_env ON log_lines (env_id, id);

-- state: leader terms, the fencing tokens of singleton work.
CREATE TABLE leader_terms (
    name text PRIMARY KEY,
    term bigint NOT NULL
);
