//! The route table: every path of the `/v1` API as a constant (axum's `{param}` syntax), and
//! [`ROUTES`], which lists each endpoint with its method, the token kinds it accepts and its
//! request and response types. The server mounts exactly these routes and generates its
//! OpenAPI document from this table.

/// Path of the OpenAPI document.
pub const OPENAPI: &str = "/v1/openapi.json";
/// The caller's token and org.
pub const WHOAMI: &str = "/v1/whoami";
/// Orgs: list (operator: all, org token: its own) and create (operator).
pub const ORGS: &str = "/v1/orgs";
/// One org.
pub const ORG: &str = "/v1/orgs/{org}";
/// An org's API tokens.
pub const TOKENS: &str = "/v1/orgs/{org}/tokens";
/// One API token (revoke with DELETE).
pub const TOKEN: &str = "/v1/orgs/{org}/tokens/{token}";
/// An org's event log (audit log and change feed).
pub const ORG_EVENTS: &str = "/v1/orgs/{org}/events";
/// An org's apps.
pub const APPS: &str = "/v1/orgs/{org}/apps";
/// One app.
pub const APP: &str = "/v1/orgs/{org}/apps/{app}";
/// An app's environments.
pub const ENVS: &str = "/v1/orgs/{org}/apps/{app}/envs";
/// One environment.
pub const ENV: &str = "/v1/orgs/{org}/apps/{app}/envs/{env}";
/// Instance counts of an environment.
pub const ENV_SCALE: &str = "/v1/orgs/{org}/apps/{app}/envs/{env}/scale";
/// Config vars of an environment.
pub const CONFIG: &str = "/v1/orgs/{org}/apps/{app}/envs/{env}/config";
/// Secrets of an environment (names, versions and digests only).
pub const SECRETS: &str = "/v1/orgs/{org}/apps/{app}/envs/{env}/secrets";
/// One secret (set with PUT, unset with DELETE).
pub const SECRET: &str = "/v1/orgs/{org}/apps/{app}/envs/{env}/secrets/{name}";
/// Releases of an environment.
pub const RELEASES: &str = "/v1/orgs/{org}/apps/{app}/envs/{env}/releases";
/// One release, by version number.
pub const RELEASE: &str = "/v1/orgs/{org}/apps/{app}/envs/{env}/releases/{version}";
/// Deploys of an environment.
pub const DEPLOYS: &str = "/v1/orgs/{org}/apps/{app}/envs/{env}/deploys";
/// One deploy.
pub const DEPLOY: &str = "/v1/orgs/{org}/apps/{app}/envs/{env}/deploys/{deploy}";
/// Deploy plans: what a deploy would do, stored and bound to the environment's state.
pub const PLANS: &str = "/v1/orgs/{org}/apps/{app}/envs/{env}/plans";
/// One deploy plan.
pub const PLAN: &str = "/v1/orgs/{org}/apps/{app}/envs/{env}/plans/{plan}";
/// Apply a deploy plan exactly as stored.
pub const PLAN_APPLY: &str = "/v1/orgs/{org}/apps/{app}/envs/{env}/plans/{plan}/apply";
/// Replace an environment's instances with fresh ones of the same release.
pub const ENV_RESTART: &str = "/v1/orgs/{org}/apps/{app}/envs/{env}/restart";
/// Instances of an environment.
pub const INSTANCES: &str = "/v1/orgs/{org}/apps/{app}/envs/{env}/instances";
/// Routes of an environment.
pub const ENV_ROUTES: &str = "/v1/orgs/{org}/apps/{app}/envs/{env}/routes";
/// Addresses allocated to an environment.
pub const ADDRESSES: &str = "/v1/orgs/{org}/apps/{app}/envs/{env}/addresses";
/// Dedicated IP addresses of an environment: list, and allocate a billed IPv4 address.
pub const IPS: &str = "/v1/orgs/{org}/apps/{app}/envs/{env}/ips";
/// One dedicated IPv4 address of an environment (release with DELETE).
pub const IP: &str = "/v1/orgs/{org}/apps/{app}/envs/{env}/ips/{address}";
/// Recent logs of an environment.
pub const LOGS: &str = "/v1/orgs/{org}/apps/{app}/envs/{env}/logs";
/// Hosts (operator).
pub const HOSTS: &str = "/v1/hosts";
/// One host, by name (operator).
pub const HOST: &str = "/v1/hosts/{host}";
/// Cordon a host (operator).
pub const HOST_CORDON: &str = "/v1/hosts/{host}/cordon";
/// Uncordon a host (operator).
pub const HOST_UNCORDON: &str = "/v1/hosts/{host}/uncordon";
/// Drain a host (operator).
pub const HOST_DRAIN: &str = "/v1/hosts/{host}/drain";
/// Ingress tokens (operator).
pub const INGRESS_TOKENS: &str = "/v1/ingress-tokens";
/// The whole event log (operator).
pub const EVENTS: &str = "/v1/events";
/// Register the calling host (host token).
pub const HOST_SELF_REGISTER: &str = "/v1/host/register";
/// Renew the calling host's lease (host token).
pub const HOST_SELF_HEARTBEAT: &str = "/v1/host/heartbeat";
/// The calling host's assignments, long-polling (host token).
pub const HOST_SELF_ASSIGNMENTS: &str = "/v1/host/assignments";
/// Report an instance state change (host token).
pub const HOST_SELF_INSTANCE_STATE: &str = "/v1/host/instances/{instance}/state";
/// Report state changes of several instances in one call (host token).
pub const HOST_SELF_INSTANCE_STATES: &str = "/v1/host/instances/states";
/// Secrets of an instance placed on the calling host (host token).
pub const HOST_SELF_INSTANCE_SECRETS: &str = "/v1/host/instances/{instance}/secrets";
/// Ship a log batch (host token).
pub const HOST_SELF_LOGS: &str = "/v1/host/logs";
/// The route table, long-polling (ingress token).
pub const INGRESS_ROUTES: &str = "/v1/ingress/routes";

/// Which tokens an endpoint accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// No token (the OpenAPI document).
    Public,
    /// Any valid token.
    AnyToken,
    /// An org token of the org in the path.
    Org,
    /// An operator token.
    Operator,
    /// An operator token or an org token (which sees only its own org).
    OperatorOrOrg,
    /// A host token (acting on its own host).
    Host,
    /// An ingress token.
    Ingress,
}

/// One endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    /// HTTP method in upper case.
    pub method: &'static str,
    /// Path template.
    pub path: &'static str,
    /// Stable operation id (for OpenAPI and logs).
    pub operation: &'static str,
    /// One-line summary.
    pub summary: &'static str,
    /// Tokens accepted.
    pub access: Access,
    /// Name of the request body type in this crate; `None` without a body.
    pub request: Option<&'static str>,
    /// Name of the query type; `None` without a query.
    pub query: Option<&'static str>,
    /// Name of the success response type; `None` for 204.
    pub response: Option<&'static str>,
    /// Success status.
    pub status: u16,
}

#[allow(clippy::too_many_arguments)] // One call per table row reads best positionally.
const fn ep(
    method: &'static str,
    path: &'static str,
    operation: &'static str,
    summary: &'static str,
    access: Access,
    request: Option<&'static str>,
    response: Option<&'static str>,
    status: u16,
) -> Endpoint {
    Endpoint {
        method,
        path,
        operation,
        summary,
        access,
        request,
        query: None,
        response,
        status,
    }
}

const fn with_query(mut endpoint: Endpoint, query: &'static str) -> Endpoint {
    endpoint.query = Some(query);
    endpoint
}

use Access::*;

/// Every endpoint of the API.
#[rustfmt::skip]
pub const ROUTES: &[Endpoint] = &[
    ep("GET", OPENAPI, "get_openapi", "The OpenAPI document of this API", Public, None, Some("OpenApi"), 200),
    ep("GET", WHOAMI, "whoami", "The calling token", AnyToken, None, Some("WhoAmI"), 200),
    ep("GET", ORGS, "list_orgs", "List orgs visible to the token", OperatorOrOrg, None, Some("List<Org>"), 200),
    ep("POST", ORGS, "create_org", "Create an org", Operator, Some("CreateOrg"), Some("Org"), 201),
    ep("GET", ORG, "get_org", "Show an org", OperatorOrOrg, None, Some("Org"), 200),
    ep("GET", TOKENS, "list_tokens", "List an org's API tokens", Org, None, Some("List<Token>"), 200),
    ep("POST", TOKENS, "create_token", "Create an API token (its secret is shown once); an operator token may create one for any org", OperatorOrOrg, Some("CreateToken"), Some("CreatedToken"), 201),
    ep("DELETE", TOKEN, "revoke_token", "Revoke an API token", Org, None, Some("Token"), 200),
    with_query(ep("GET", ORG_EVENTS, "list_org_events", "Events of an org after a cursor, long-polling", Org, None, Some("EventPage"), 200), "EventQuery"),
    ep("GET", APPS, "list_apps", "List apps", Org, None, Some("List<App>"), 200),
    ep("POST", APPS, "create_app", "Create an app", Org, Some("CreateApp"), Some("App"), 201),
    ep("GET", APP, "get_app", "Show an app", Org, None, Some("App"), 200),
    ep("DELETE", APP, "delete_app", "Delete an app without environments", Org, None, None, 204),
    ep("GET", ENVS, "list_envs", "List environments", Org, None, Some("List<Env>"), 200),
    ep("POST", ENVS, "create_env", "Create an environment", Org, Some("CreateEnv"), Some("Env"), 201),
    ep("GET", ENV, "get_env", "Show an environment", Org, None, Some("Env"), 200),
    ep("DELETE", ENV, "delete_env", "Delete an environment and stop its instances", Org, None, None, 204),
    ep("PUT", ENV_SCALE, "scale_env", "Set instance counts per process type", Org, Some("ScaleEnv"), Some("Env"), 200),
    ep("GET", CONFIG, "get_config", "Show config vars", Org, None, Some("ConfigVars"), 200),
    ep("PATCH", CONFIG, "update_config", "Set and unset config vars", Org, Some("UpdateConfig"), Some("ConfigVars"), 200),
    ep("GET", SECRETS, "list_secrets", "List secret names, versions and digests", Org, None, Some("List<SecretMeta>"), 200),
    ep("PUT", SECRET, "set_secret", "Set a secret", Org, Some("SetSecret"), Some("SecretMeta"), 200),
    ep("DELETE", SECRET, "unset_secret", "Remove a secret", Org, None, None, 204),
    ep("GET", RELEASES, "list_releases", "List releases, newest first", Org, None, Some("List<Release>"), 200),
    ep("POST", RELEASES, "create_release", "Create a release from an image digest and a resolved manifest", Org, Some("CreateRelease"), Some("Release"), 201),
    ep("GET", RELEASE, "get_release", "Show a release", Org, None, Some("Release"), 200),
    ep("GET", DEPLOYS, "list_deploys", "List deploys, newest first", Org, None, Some("List<Deploy>"), 200),
    ep("POST", DEPLOYS, "create_deploy", "Request a deploy", Org, Some("CreateDeploy"), Some("CreatedDeploy"), 201),
    ep("GET", DEPLOY, "get_deploy", "Show a deploy", Org, None, Some("Deploy"), 200),
    ep("POST", PLANS, "create_plan", "Plan a deploy without changing anything, and store the plan", Org, Some("CreatePlan"), Some("Plan"), 201),
    ep("GET", PLAN, "get_plan", "Show a stored deploy plan", Org, None, Some("Plan"), 200),
    ep("POST", PLAN_APPLY, "apply_plan", "Deploy exactly a stored plan, or fail with plan_conflict when the environment changed", Org, Some("ApplyPlan"), Some("CreatedDeploy"), 201),
    ep("POST", ENV_RESTART, "restart_env", "Replace the instances of every or one process type, as a deploy", Org, Some("RestartEnv"), Some("CreatedDeploy"), 201),
    ep("GET", INSTANCES, "list_instances", "List instances", Org, None, Some("List<Instance>"), 200),
    ep("GET", ENV_ROUTES, "list_env_routes", "List routes", Org, None, Some("List<Route>"), 200),
    ep("GET", ADDRESSES, "list_addresses", "List allocated addresses", Org, None, Some("List<Address>"), 200),
    ep("GET", IPS, "list_ips", "List dedicated IPv6 and IPv4 addresses", Org, None, Some("List<DedicatedIp>"), 200),
    ep("POST", IPS, "allocate_ip", "Allocate a billed dedicated IPv4 address from the pool", Org, Some("AllocateIp"), Some("DedicatedIp"), 201),
    ep("DELETE", IP, "release_ip", "Release a dedicated IPv4 address", Org, None, None, 204),
    with_query(ep("GET", LOGS, "get_logs", "Recent log lines", Org, None, Some("LogPage"), 200), "LogQuery"),
    ep("GET", HOSTS, "list_hosts", "List hosts", Operator, None, Some("List<Host>"), 200),
    ep("POST", HOSTS, "create_host", "Create a host and its token", Operator, Some("CreateHost"), Some("CreatedHost"), 201),
    ep("GET", HOST, "get_host", "Show a host", Operator, None, Some("Host"), 200),
    ep("POST", HOST_CORDON, "cordon_host", "Stop placing instances on a host", Operator, None, Some("Host"), 200),
    ep("POST", HOST_UNCORDON, "uncordon_host", "Place instances on a host again", Operator, None, Some("Host"), 200),
    ep("POST", HOST_DRAIN, "drain_host", "Move a host's instances away", Operator, None, Some("Host"), 200),
    ep("POST", INGRESS_TOKENS, "create_ingress_token", "Create an ingress token", Operator, Some("CreateIngressToken"), Some("CreatedToken"), 201),
    with_query(ep("GET", EVENTS, "list_events", "The whole event log after a cursor, long-polling", Operator, None, Some("EventPage"), 200), "EventQuery"),
    ep("POST", HOST_SELF_REGISTER, "register_host", "Register the calling host", Host, Some("RegisterHost"), Some("HostLease"), 200),
    ep("POST", HOST_SELF_HEARTBEAT, "heartbeat", "Renew the calling host's lease", Host, Some("Heartbeat"), Some("HostLease"), 200),
    with_query(ep("GET", HOST_SELF_ASSIGNMENTS, "watch_assignments", "The calling host's assignments, long-polling", Host, None, Some("HostAssignments"), 200), "AssignmentsQuery"),
    ep("POST", HOST_SELF_INSTANCE_STATE, "report_instance_state", "Report an instance state change", Host, Some("ReportInstanceState"), Some("Instance"), 200),
    ep("POST", HOST_SELF_INSTANCE_STATES, "report_instance_states", "Report state changes of several instances", Host, Some("ReportInstanceStates"), Some("ReportedInstanceStates"), 200),
    ep("GET", HOST_SELF_INSTANCE_SECRETS, "get_instance_secrets", "Secret values for an instance on the calling host", Host, None, Some("InstanceSecrets"), 200),
    ep("POST", HOST_SELF_LOGS, "ship_logs", "Ship a batch of log lines", Host, Some("LogBatch"), None, 204),
    with_query(ep("GET", INGRESS_ROUTES, "watch_routes", "The route table, long-polling", Ingress, None, Some("RouteTable"), 200), "WatchQuery"),
];

/// Fills the `{param}` placeholders of `template` in order, percent-encoding each value.
pub fn fill(template: &str, values: &[&str]) -> String {
    let mut out = String::with_capacity(template.len() + 32);
    let mut values = values.iter();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find('}') else {
            break;
        };
        if let Some(value) = values.next() {
            push_encoded(&mut out, value);
        }
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    out
}

fn push_encoded(out: &mut String, value: &str) {
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_replaces_placeholders_in_order() {
        assert_eq!(
            fill(RELEASE, &["acme", "web", "prod", "3"]),
            "/v1/orgs/acme/apps/web/envs/prod/releases/3"
        );
    }

    #[test]
    fn fill_encodes_reserved_characters() {
        assert_eq!(fill(ORG, &["a/b c"]), "/v1/orgs/a%2Fb%20c");
    }

    #[test]
    fn routes_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for route in ROUTES {
            assert!(seen.insert((route.method, route.path)), "{route:?}");
        }
        let mut operations = std::collections::HashSet::new();
        for route in ROUTES {
            assert!(operations.insert(route.operation), "{route:?}");
        }
    }
}
