-- IPAM allocations: the cluster prefix, one slot per host and one address pair per instance.
-- The allocator in kiln-scheduler decides; these tables persist its decisions, and their
-- UNIQUE constraints guarantee that no slot or address is handed out twice, even to two
-- control planes racing.

CREATE TABLE ipam_cluster (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    prefix text NOT NULL,
    host_ipv4_prefix_len smallint NOT NULL
);

CREATE TABLE ipam_host_slots (
    host_id uuid PRIMARY KEY,
    slot integer NOT NULL UNIQUE CHECK (slot > 0)
);

-- Addresses are stored in Rust's canonical text form, so equal addresses are equal strings.
CREATE TABLE ipam_instance_addresses (
    instance_id uuid PRIMARY KEY,
    env_id uuid NOT NULL,
    host_id uuid NOT NULL,
    ipv6 text NOT NULL UNIQUE,
    ipv4 text NOT NULL UNIQUE
);

CREATE INDEX ipam_instance_addresses_host ON ipam_instance_addresses (host_id);

-- Orchestrator state: the plan of each deploy, fixed when the deploy starts, and which
-- instances receive traffic. Step outcomes are events (`DeployStepCompleted`).
CREATE TABLE deploy_plans (
    deploy_id    uuid PRIMARY KEY,
    plan         jsonb NOT NULL,
    base_version bigint NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE routed_instances (
    env_id      uuid NOT NULL,
    instance_id uuid NOT NULL,
    PRIMARY KEY (env_id, instance_id)
);
