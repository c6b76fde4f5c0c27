-- state: the route-table cursor each ingress last reported applied, by ingress token. An
-- ingress asks for the table after cursor C only once it has applied the table at C, so C is
-- its acknowledgement. A deploy stops an unrouted instance once every ingress seen recently
-- has acknowledged the route change (or a deadline passes), so no ingress still sends new
-- connections to an instance that is going away.
CREATE TABLE ingress_acks (
    token_id uuid PRIMARY KEY,
    cursor   bigint NOT NULL,
    seen_at  timestamptz NOT NULL
);
