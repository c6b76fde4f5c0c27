-- Dedicated IPv4 addresses, a billed add-on of environments.

-- state: the operator's pool of public IPv4 prefixes, rewritten from kiln-control's config
-- (`dedicated_ipv4_pool`) whenever a server starts. Allocated addresses are rows of the
-- `addresses` projection with kind `dedicated_ipv4`.
CREATE TABLE dedicated_ipv4_pool (
    position int PRIMARY KEY,
    prefix   text NOT NULL UNIQUE
);

-- The pool prefix a dedicated IPv4 address came from; NULL for every other kind.
ALTER TABLE addresses ADD COLUMN pool text;
