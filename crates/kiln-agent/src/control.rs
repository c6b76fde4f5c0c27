//! The agent's view of the control plane: a small trait over the host-token endpoints, so the
//! reconcile loop can be driven by a scripted control plane in unit tests and by
//! [`kiln_api::Client`] in production.

use std::future::Future;

use kiln_api::ClientError;
use kiln_api::types::{
    AssignmentsQuery, Heartbeat, HostAssignments, HostLease, InstanceSecrets, LogBatch,
    RegisterHost, ReportInstanceState, ReportInstanceStates, ReportedInstanceStates,
};
use kiln_core::InstanceId;

/// The host-token endpoints the agent calls.
pub trait ControlPlane: Clone + Send + Sync + 'static {
    /// Registers the host.
    fn register(
        &self,
        request: &RegisterHost,
    ) -> impl Future<Output = Result<HostLease, ClientError>> + Send;

    /// Renews the lease.
    fn heartbeat(
        &self,
        request: &Heartbeat,
    ) -> impl Future<Output = Result<HostLease, ClientError>> + Send;

    /// Returns the assignment set after `after`, waiting up to `wait_secs`. With `changes` the
    /// response may contain only what changed after `after` (see
    /// [`HostAssignments::complete`]).
    fn watch(
        &self,
        after: u64,
        wait_secs: u64,
        changes: bool,
    ) -> impl Future<Output = Result<HostAssignments, ClientError>> + Send;

    /// Reports a state change of an instance.
    fn report(
        &self,
        instance: InstanceId,
        report: &ReportInstanceState,
    ) -> impl Future<Output = Result<(), ClientError>> + Send;

    /// Reports state changes of several instances in one call, in order. The default sends
    /// them one by one, for control planes (test doubles) without the batch endpoint.
    fn report_batch(
        &self,
        batch: &ReportInstanceStates,
    ) -> impl Future<Output = Result<ReportedInstanceStates, ClientError>> + Send {
        async move {
            for report in &batch.reports {
                let single = ReportInstanceState {
                    state: report.state,
                    detail: report.detail.clone(),
                    exit_code: report.exit_code,
                    output: report.output.clone(),
                };
                self.report(report.instance_id, &single).await?;
            }
            Ok(ReportedInstanceStates {
                recorded: u32::try_from(batch.reports.len()).unwrap_or(u32::MAX),
                unknown: Vec::new(),
            })
        }
    }

    /// Fetches the secret values of an instance placed on this host.
    fn secrets(
        &self,
        instance: InstanceId,
    ) -> impl Future<Output = Result<InstanceSecrets, ClientError>> + Send;

    /// Ships log lines.
    fn ship_logs(&self, batch: &LogBatch) -> impl Future<Output = Result<(), ClientError>> + Send;
}

impl ControlPlane for kiln_api::Client {
    async fn register(&self, request: &RegisterHost) -> Result<HostLease, ClientError> {
        self.register_host(request).await
    }

    async fn heartbeat(&self, request: &Heartbeat) -> Result<HostLease, ClientError> {
        kiln_api::Client::heartbeat(self, request).await
    }

    async fn watch(
        &self,
        after: u64,
        wait_secs: u64,
        changes: bool,
    ) -> Result<HostAssignments, ClientError> {
        // A request for the complete set leaves the flag out, so a control plane that
        // predates the flag still accepts it.
        let query = AssignmentsQuery {
            after: Some(after),
            wait: Some(wait_secs),
            changes: changes.then_some(true),
        };
        self.watch_assignments(&query).await
    }

    async fn report(
        &self,
        instance: InstanceId,
        report: &ReportInstanceState,
    ) -> Result<(), ClientError> {
        self.report_instance_state(instance, report).await.map(drop)
    }

    async fn report_batch(
        &self,
        batch: &ReportInstanceStates,
    ) -> Result<ReportedInstanceStates, ClientError> {
        self.report_instance_states(batch).await
    }

    async fn secrets(&self, instance: InstanceId) -> Result<InstanceSecrets, ClientError> {
        self.instance_secrets(instance).await
    }

    async fn ship_logs(&self, batch: &LogBatch) -> Result<(), ClientError> {
        kiln_api::Client::ship_logs(self, batch).await
    }
}
