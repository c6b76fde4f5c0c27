//! A typed async client for the `/v1` API, one method per endpoint.
//!
//! Every mutating call sends an `Idempotency-Key` header, a fresh random one by default. A
//! caller that retries a call after a network failure uses [`Client::with_idempotency_key`]
//! so the server recognizes the retry and returns the first result instead of acting twice.

use std::net::IpAddr;
use std::time::Duration;

use kiln_core::{AppName, DeployId, EnvName, InstanceId, OrgName, TokenId};
use reqwest::Method;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{ErrorBody, ErrorCode};
use crate::events::{EventPage, EventQuery};
use crate::routes::{self, fill};
use crate::types::*;

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The base URL is not a valid http or https URL.
    #[error("invalid control plane URL {url:?}: expected http://HOST:PORT or https://HOST")]
    InvalidUrl {
        /// The rejected URL.
        url: String,
    },
    /// The HTTP client could not be built.
    #[error("failed to build the HTTP client")]
    Build(#[source] reqwest::Error),
    /// The request could not be sent or the response not read.
    #[error("request {method} {path} failed")]
    Transport {
        /// Method.
        method: String,
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: reqwest::Error,
    },
    /// The server returned an error body.
    #[error("{method} {path}: {body} (HTTP {status})")]
    Api {
        /// Method.
        method: String,
        /// Path.
        path: String,
        /// HTTP status.
        status: u16,
        /// The error body.
        body: ErrorBody,
    },
    /// The server returned a response that is not the expected JSON.
    #[error("{method} {path}: unexpected response (HTTP {status}): {snippet}")]
    UnexpectedResponse {
        /// Method.
        method: String,
        /// Path.
        path: String,
        /// HTTP status.
        status: u16,
        /// The first bytes of the body.
        snippet: String,
    },
}

impl ClientError {
    /// Returns the API error code, when the server returned an error body.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Api { body, .. } => Some(body.code),
            _ => None,
        }
    }

    /// Returns true when the same request may succeed later (transport errors, conflicts,
    /// unavailability).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Transport { .. } => true,
            Self::Api { body, .. } => body.code.is_retryable(),
            _ => false,
        }
    }
}

/// Client of the `/v1` API.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
    idempotency_key: Option<String>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("base", &self.base).finish()
    }
}

/// Extra time allowed beyond a long-poll wait before the request times out.
const LONG_POLL_SLACK: Duration = Duration::from_secs(15);

/// Timeout of ordinary requests.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

impl Client {
    /// Creates a client for the control plane at `base_url` (such as
    /// `http://127.0.0.1:7070`) authenticating with `token`.
    pub fn new(base_url: &str, token: impl Into<String>) -> Result<Self, ClientError> {
        let base = base_url.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ClientError::InvalidUrl { url: base });
        }
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(ClientError::Build)?;
        Ok(Self {
            http,
            base,
            token: token.into(),
            idempotency_key: None,
        })
    }

    /// Returns a copy of this client that sends `key` as the idempotency key of every
    /// mutating call, for retrying one call safely.
    pub fn with_idempotency_key(&self, key: impl Into<String>) -> Self {
        let mut client = self.clone();
        client.idempotency_key = Some(key.into());
        client
    }

    /// Returns the base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    async fn call<B: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: Option<&(impl Serialize + ?Sized)>,
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<Option<R>, ClientError> {
        let transport = |source| ClientError::Transport {
            method: method.to_string(),
            path: path.to_owned(),
            source,
        };

        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .timeout(timeout);
        if let Some(query) = query {
            request = request.query(query);
        }
        if method != Method::GET {
            let key = self
                .idempotency_key
                .clone()
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            request = request.header(crate::IDEMPOTENCY_KEY_HEADER, key);
        }
        if let Some(body) = body {
            request = request.json(body);
        }

        let response = request.send().await.map_err(transport)?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await.map_err(transport)?;

        if (200..300).contains(&status) {
            if status == 204 || bytes.is_empty() {
                return Ok(None);
            }
            return serde_json::from_slice(&bytes).map(Some).map_err(|_| {
                ClientError::UnexpectedResponse {
                    method: method.to_string(),
                    path: path.to_owned(),
                    status,
                    snippet: snippet(&bytes),
                }
            });
        }

        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => Err(ClientError::Api {
                method: method.to_string(),
                path: path.to_owned(),
                status,
                body,
            }),
            Err(_) => Err(ClientError::UnexpectedResponse {
                method: method.to_string(),
                path: path.to_owned(),
                status,
                snippet: snippet(&bytes),
            }),
        }
    }

    async fn get<R: DeserializeOwned>(&self, path: &str) -> Result<R, ClientError> {
        let value = self
            .call::<(), R>(Method::GET, path, None::<&()>, None, REQUEST_TIMEOUT)
            .await?;
        value.ok_or_else(|| empty(Method::GET, path))
    }

    async fn get_query<Q: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        query: &Q,
        wait: Option<u64>,
    ) -> Result<R, ClientError> {
        let timeout = REQUEST_TIMEOUT + Duration::from_secs(wait.unwrap_or(0)) + LONG_POLL_SLACK;
        let value = self
            .call::<(), R>(Method::GET, path, Some(query), None, timeout)
            .await?;
        value.ok_or_else(|| empty(Method::GET, path))
    }

    async fn send<B: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<R, ClientError> {
        let value = self
            .call::<B, R>(method.clone(), path, None::<&()>, body, REQUEST_TIMEOUT)
            .await?;
        value.ok_or_else(|| empty(method, path))
    }

    async fn send_no_content<B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<(), ClientError> {
        self.call::<B, serde_json::Value>(method, path, None::<&()>, body, REQUEST_TIMEOUT)
            .await?;
        Ok(())
    }

    /// `GET /v1/whoami`.
    pub async fn whoami(&self) -> Result<WhoAmI, ClientError> {
        self.get(routes::WHOAMI).await
    }

    /// `GET /v1/orgs`.
    pub async fn list_orgs(&self) -> Result<List<Org>, ClientError> {
        self.get(routes::ORGS).await
    }

    /// `POST /v1/orgs`.
    pub async fn create_org(&self, request: &CreateOrg) -> Result<Org, ClientError> {
        self.send(Method::POST, routes::ORGS, Some(request)).await
    }

    /// `GET /v1/orgs/{org}`.
    pub async fn get_org(&self, org: &OrgName) -> Result<Org, ClientError> {
        self.get(&fill(routes::ORG, &[org.as_str()])).await
    }

    /// `GET /v1/orgs/{org}/tokens`.
    pub async fn list_tokens(&self, org: &OrgName) -> Result<List<Token>, ClientError> {
        self.get(&fill(routes::TOKENS, &[org.as_str()])).await
    }

    /// `POST /v1/orgs/{org}/tokens`.
    pub async fn create_token(
        &self,
        org: &OrgName,
        request: &CreateToken,
    ) -> Result<CreatedToken, ClientError> {
        let path = fill(routes::TOKENS, &[org.as_str()]);
        self.send(Method::POST, &path, Some(request)).await
    }

    /// `DELETE /v1/orgs/{org}/tokens/{token}`.
    pub async fn revoke_token(&self, org: &OrgName, token: TokenId) -> Result<Token, ClientError> {
        let path = fill(routes::TOKEN, &[org.as_str(), &token.to_string()]);
        self.send::<(), _>(Method::DELETE, &path, None).await
    }

    /// `GET /v1/orgs/{org}/events`, long-polling up to `query.wait` seconds.
    pub async fn org_events(
        &self,
        org: &OrgName,
        query: &EventQuery,
    ) -> Result<EventPage, ClientError> {
        let path = fill(routes::ORG_EVENTS, &[org.as_str()]);
        self.get_query(&path, query, query.wait).await
    }

    /// `GET /v1/events` (operator), long-polling up to `query.wait` seconds.
    pub async fn events(&self, query: &EventQuery) -> Result<EventPage, ClientError> {
        self.get_query(routes::EVENTS, query, query.wait).await
    }

    /// `GET /v1/orgs/{org}/apps`.
    pub async fn list_apps(&self, org: &OrgName) -> Result<List<App>, ClientError> {
        self.get(&fill(routes::APPS, &[org.as_str()])).await
    }

    /// `POST /v1/orgs/{org}/apps`.
    pub async fn create_app(&self, org: &OrgName, request: &CreateApp) -> Result<App, ClientError> {
        let path = fill(routes::APPS, &[org.as_str()]);
        self.send(Method::POST, &path, Some(request)).await
    }

    /// `GET /v1/orgs/{org}/apps/{app}`.
    pub async fn get_app(&self, org: &OrgName, app: &AppName) -> Result<App, ClientError> {
        self.get(&fill(routes::APP, &[org.as_str(), app.as_str()]))
            .await
    }

    /// `DELETE /v1/orgs/{org}/apps/{app}`.
    pub async fn delete_app(&self, org: &OrgName, app: &AppName) -> Result<(), ClientError> {
        let path = fill(routes::APP, &[org.as_str(), app.as_str()]);
        self.send_no_content::<()>(Method::DELETE, &path, None)
            .await
    }

    /// `GET .../envs`.
    pub async fn list_envs(&self, org: &OrgName, app: &AppName) -> Result<List<Env>, ClientError> {
        self.get(&fill(routes::ENVS, &[org.as_str(), app.as_str()]))
            .await
    }

    /// `POST .../envs`.
    pub async fn create_env(
        &self,
        org: &OrgName,
        app: &AppName,
        request: &CreateEnv,
    ) -> Result<Env, ClientError> {
        let path = fill(routes::ENVS, &[org.as_str(), app.as_str()]);
        self.send(Method::POST, &path, Some(request)).await
    }

    /// `GET .../envs/{env}`.
    pub async fn get_env(&self, env: &EnvPath) -> Result<Env, ClientError> {
        self.get(&env.fill(routes::ENV, &[])).await
    }

    /// `DELETE .../envs/{env}`.
    pub async fn delete_env(&self, env: &EnvPath) -> Result<(), ClientError> {
        let path = env.fill(routes::ENV, &[]);
        self.send_no_content::<()>(Method::DELETE, &path, None)
            .await
    }

    /// `PUT .../envs/{env}/scale`.
    pub async fn scale_env(&self, env: &EnvPath, request: &ScaleEnv) -> Result<Env, ClientError> {
        let path = env.fill(routes::ENV_SCALE, &[]);
        self.send(Method::PUT, &path, Some(request)).await
    }

    /// `GET .../config`.
    pub async fn get_config(&self, env: &EnvPath) -> Result<ConfigVars, ClientError> {
        self.get(&env.fill(routes::CONFIG, &[])).await
    }

    /// `PATCH .../config`.
    pub async fn update_config(
        &self,
        env: &EnvPath,
        request: &UpdateConfig,
    ) -> Result<ConfigVars, ClientError> {
        let path = env.fill(routes::CONFIG, &[]);
        self.send(Method::PATCH, &path, Some(request)).await
    }

    /// `GET .../secrets`.
    pub async fn list_secrets(&self, env: &EnvPath) -> Result<List<SecretMeta>, ClientError> {
        self.get(&env.fill(routes::SECRETS, &[])).await
    }

    /// `PUT .../secrets/{name}`.
    pub async fn set_secret(
        &self,
        env: &EnvPath,
        name: &str,
        request: &SetSecret,
    ) -> Result<SecretMeta, ClientError> {
        let path = env.fill(routes::SECRET, &[name]);
        self.send(Method::PUT, &path, Some(request)).await
    }

    /// `DELETE .../secrets/{name}`.
    pub async fn unset_secret(&self, env: &EnvPath, name: &str) -> Result<(), ClientError> {
        let path = env.fill(routes::SECRET, &[name]);
        self.send_no_content::<()>(Method::DELETE, &path, None)
            .await
    }

    /// `GET .../releases`.
    pub async fn list_releases(&self, env: &EnvPath) -> Result<List<Release>, ClientError> {
        self.get(&env.fill(routes::RELEASES, &[])).await
    }

    /// `POST .../releases`.
    pub async fn create_release(
        &self,
        env: &EnvPath,
        request: &CreateRelease,
    ) -> Result<Release, ClientError> {
        let path = env.fill(routes::RELEASES, &[]);
        self.send(Method::POST, &path, Some(request)).await
    }

    /// `GET .../releases/{version}`.
    pub async fn get_release(&self, env: &EnvPath, version: u64) -> Result<Release, ClientError> {
        self.get(&env.fill(routes::RELEASE, &[&version.to_string()]))
            .await
    }

    /// `GET .../deploys`.
    pub async fn list_deploys(&self, env: &EnvPath) -> Result<List<Deploy>, ClientError> {
        self.get(&env.fill(routes::DEPLOYS, &[])).await
    }

    /// `POST .../deploys`.
    pub async fn create_deploy(
        &self,
        env: &EnvPath,
        request: &CreateDeploy,
    ) -> Result<CreatedDeploy, ClientError> {
        let path = env.fill(routes::DEPLOYS, &[]);
        self.send(Method::POST, &path, Some(request)).await
    }

    /// `GET .../deploys/{deploy}`.
    pub async fn get_deploy(&self, env: &EnvPath, deploy: DeployId) -> Result<Deploy, ClientError> {
        self.get(&env.fill(routes::DEPLOY, &[&deploy.to_string()]))
            .await
    }

    /// `POST .../plans`.
    pub async fn create_plan(
        &self,
        env: &EnvPath,
        request: &CreatePlan,
    ) -> Result<Plan, ClientError> {
        let path = env.fill(routes::PLANS, &[]);
        self.send(Method::POST, &path, Some(request)).await
    }

    /// `GET .../plans/{plan}`.
    pub async fn get_plan(&self, env: &EnvPath, plan: PlanId) -> Result<Plan, ClientError> {
        self.get(&env.fill(routes::PLAN, &[&plan.to_string()]))
            .await
    }

    /// `POST .../plans/{plan}/apply`.
    pub async fn apply_plan(
        &self,
        env: &EnvPath,
        plan: PlanId,
    ) -> Result<CreatedDeploy, ClientError> {
        let path = env.fill(routes::PLAN_APPLY, &[&plan.to_string()]);
        self.send(Method::POST, &path, Some(&ApplyPlan::default()))
            .await
    }

    /// `POST .../restart`.
    pub async fn restart_env(
        &self,
        env: &EnvPath,
        request: &RestartEnv,
    ) -> Result<CreatedDeploy, ClientError> {
        let path = env.fill(routes::ENV_RESTART, &[]);
        self.send(Method::POST, &path, Some(request)).await
    }

    /// `GET .../instances`.
    pub async fn list_instances(&self, env: &EnvPath) -> Result<List<Instance>, ClientError> {
        self.get(&env.fill(routes::INSTANCES, &[])).await
    }

    /// `GET .../routes`.
    pub async fn list_env_routes(&self, env: &EnvPath) -> Result<List<Route>, ClientError> {
        self.get(&env.fill(routes::ENV_ROUTES, &[])).await
    }

    /// `GET .../addresses`.
    pub async fn list_addresses(&self, env: &EnvPath) -> Result<List<Address>, ClientError> {
        self.get(&env.fill(routes::ADDRESSES, &[])).await
    }

    /// `GET .../ips`.
    pub async fn list_ips(&self, env: &EnvPath) -> Result<List<DedicatedIp>, ClientError> {
        self.get(&env.fill(routes::IPS, &[])).await
    }

    /// `POST .../ips`.
    pub async fn allocate_ip(
        &self,
        env: &EnvPath,
        request: &AllocateIp,
    ) -> Result<DedicatedIp, ClientError> {
        let path = env.fill(routes::IPS, &[]);
        self.send(Method::POST, &path, Some(request)).await
    }

    /// `DELETE .../ips/{address}`.
    pub async fn release_ip(&self, env: &EnvPath, address: IpAddr) -> Result<(), ClientError> {
        let path = env.fill(routes::IP, &[&address.to_string()]);
        self.send_no_content::<()>(Method::DELETE, &path, None)
            .await
    }

    /// `GET .../logs`, long-polling up to `query.wait` seconds when `after` is set.
    pub async fn logs(&self, env: &EnvPath, query: &LogQuery) -> Result<LogPage, ClientError> {
        let path = env.fill(routes::LOGS, &[]);
        self.get_query(&path, query, query.wait).await
    }

    /// `GET /v1/hosts` (operator).
    pub async fn list_hosts(&self) -> Result<List<Host>, ClientError> {
        self.get(routes::HOSTS).await
    }

    /// `POST /v1/hosts` (operator).
    pub async fn create_host(&self, request: &CreateHost) -> Result<CreatedHost, ClientError> {
        self.send(Method::POST, routes::HOSTS, Some(request)).await
    }

    /// `GET /v1/hosts/{host}` (operator).
    pub async fn get_host(&self, name: &str) -> Result<Host, ClientError> {
        self.get(&fill(routes::HOST, &[name])).await
    }

    /// `POST /v1/hosts/{host}/cordon` (operator).
    pub async fn cordon_host(&self, name: &str) -> Result<Host, ClientError> {
        let path = fill(routes::HOST_CORDON, &[name]);
        self.send::<(), _>(Method::POST, &path, None).await
    }

    /// `POST /v1/hosts/{host}/uncordon` (operator).
    pub async fn uncordon_host(&self, name: &str) -> Result<Host, ClientError> {
        let path = fill(routes::HOST_UNCORDON, &[name]);
        self.send::<(), _>(Method::POST, &path, None).await
    }

    /// `POST /v1/hosts/{host}/drain` (operator).
    pub async fn drain_host(&self, name: &str) -> Result<Host, ClientError> {
        let path = fill(routes::HOST_DRAIN, &[name]);
        self.send::<(), _>(Method::POST, &path, None).await
    }

    /// `POST /v1/ingress-tokens` (operator).
    pub async fn create_ingress_token(
        &self,
        request: &CreateIngressToken,
    ) -> Result<CreatedToken, ClientError> {
        self.send(Method::POST, routes::INGRESS_TOKENS, Some(request))
            .await
    }

    /// `POST /v1/host/register` (host token).
    pub async fn register_host(&self, request: &RegisterHost) -> Result<HostLease, ClientError> {
        self.send(Method::POST, routes::HOST_SELF_REGISTER, Some(request))
            .await
    }

    /// `POST /v1/host/heartbeat` (host token).
    pub async fn heartbeat(&self, request: &Heartbeat) -> Result<HostLease, ClientError> {
        self.send(Method::POST, routes::HOST_SELF_HEARTBEAT, Some(request))
            .await
    }

    /// `GET /v1/host/assignments` (host token), long-polling up to `query.wait` seconds. The
    /// response is the complete set unless `query.changes` requests the changes only.
    pub async fn watch_assignments(
        &self,
        query: &AssignmentsQuery,
    ) -> Result<HostAssignments, ClientError> {
        self.get_query(routes::HOST_SELF_ASSIGNMENTS, query, query.wait)
            .await
    }

    /// `POST /v1/host/instances/{instance}/state` (host token).
    pub async fn report_instance_state(
        &self,
        instance: InstanceId,
        request: &ReportInstanceState,
    ) -> Result<Instance, ClientError> {
        let path = fill(routes::HOST_SELF_INSTANCE_STATE, &[&instance.to_string()]);
        self.send(Method::POST, &path, Some(request)).await
    }

    /// `POST /v1/host/instances/states` (host token).
    pub async fn report_instance_states(
        &self,
        request: &ReportInstanceStates,
    ) -> Result<ReportedInstanceStates, ClientError> {
        self.send(
            Method::POST,
            routes::HOST_SELF_INSTANCE_STATES,
            Some(request),
        )
        .await
    }

    /// `GET /v1/host/instances/{instance}/secrets` (host token).
    pub async fn instance_secrets(
        &self,
        instance: InstanceId,
    ) -> Result<InstanceSecrets, ClientError> {
        self.get(&fill(
            routes::HOST_SELF_INSTANCE_SECRETS,
            &[&instance.to_string()],
        ))
        .await
    }

    /// `POST /v1/host/logs` (host token).
    pub async fn ship_logs(&self, batch: &LogBatch) -> Result<(), ClientError> {
        self.send_no_content(Method::POST, routes::HOST_SELF_LOGS, Some(batch))
            .await
    }

    /// `GET /v1/ingress/routes` (ingress token), long-polling up to `query.wait` seconds.
    pub async fn watch_routes(&self, query: &WatchQuery) -> Result<RouteTable, ClientError> {
        self.get_query(routes::INGRESS_ROUTES, query, query.wait)
            .await
    }
}

/// The org, app and environment names that address an environment's endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EnvPath {
    /// Org name.
    pub org: OrgName,
    /// App name.
    pub app: AppName,
    /// Environment name.
    pub env: EnvName,
}

impl EnvPath {
    /// Creates an environment path.
    pub fn new(org: OrgName, app: AppName, env: EnvName) -> Self {
        Self { org, app, env }
    }

    fn fill(&self, template: &str, extra: &[&str]) -> String {
        let mut values = vec![self.org.as_str(), self.app.as_str(), self.env.as_str()];
        values.extend_from_slice(extra);
        fill(template, &values)
    }
}

fn empty(method: Method, path: &str) -> ClientError {
    ClientError::UnexpectedResponse {
        method: method.to_string(),
        path: path.to_owned(),
        status: 204,
        snippet: String::new(),
    }
}

fn snippet(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    text.chars().take(200).collect()
}
