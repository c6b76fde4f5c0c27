-- state: stored deploy plans. A plan is not a change of the environment, so it is not an
-- event; applying one appends the deploy's events and records the deploy it became.
CREATE TABLE plans (
    id                 uuid PRIMARY KEY,
    env_id             uuid NOT NULL,
    deploy_id          uuid NOT NULL,
    base_version       bigint NOT NULL,
    -- The events applying the plan appends before `DeployRequested` (a config restore for a
    -- rollback, `ReleaseCreated` for a new release), as JSON.
    events             jsonb NOT NULL,
    release_id         uuid NOT NULL,
    strategy           text NOT NULL,
    -- The scheduler's plan, as the orchestrator runs it.
    plan               jsonb NOT NULL,
    -- The plan as the API returns it.
    summary            jsonb NOT NULL,
    created_at         timestamptz NOT NULL,
    expires_at         timestamptz NOT NULL,
    applied_at         timestamptz
);
CREATE INDEX plans_env ON plans (env_id, created_at);
