-- Every version of a secret's value is kept, so an instance gets the values of its own
-- release (a restart or a scale-up of an old release does not pick up later changes) and a
-- rollback can point a name back at an older value. Rows are removed with their environment.
ALTER TABLE secret_values DROP CONSTRAINT secret_values_pkey;
ALTER TABLE secret_values ADD PRIMARY KEY (env_id, name, version);
