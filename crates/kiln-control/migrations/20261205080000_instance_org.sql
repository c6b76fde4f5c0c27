-- The org of an instance read from its placement event, for instances whose environment row
-- is gone: an environment's deletion asks its instances to stop, and their exit reports and
-- removal come after the row has been deleted. The instance's stream name is
-- `store::streams::instance`, `instance:inst_<32 hex digits>`.
CREATE FUNCTION kiln_instance_org_from_log(instance uuid) RETURNS uuid
LANGUAGE sql STABLE STRICT
RETURN (SELECT ev.org_id FROM events ev
        WHERE ev.stream = 'instance:inst_' || replace(instance::text, '-', '')
        ORDER BY ev.stream_version LIMIT 1);
