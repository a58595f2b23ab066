//! The gRPC edge: the Telemetry and Admin services. Handlers only forward to the ingest task and the
//! group controllers and turn their answers into protobuf; errors become `tonic::Status` here and only
//! here, with a message an operator can act on.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ebb_proto::v1::admin_server::Admin;
use ebb_proto::v1::enrollment_server::Enrollment;
use ebb_proto::v1::telemetry_server::Telemetry;
use ebb_proto::v1::{
    Ack, AgentSettings, CreateTokenRequest, CreateTokenResponse, EnrollRequest, EnrollResponse, ExplainRequest,
    ExplainResponse, Explanation, JoinToken, ListActivitiesRequest, ListActivitiesResponse, ListGroupsRequest,
    ListGroupsResponse, ListMembersRequest, ListMembersResponse, ListTokensRequest, ListTokensResponse, RefreshRequest,
    RefreshResponse, ReloadRequest, ReloadResponse, RenewRequest, RenewResponse, ReportRequest, ReportResponse,
    RevokeMemberRequest, RevokeMemberResponse, RevokeTokenRequest, RevokeTokenResponse, SetDesiredCapacityRequest,
    SetDesiredCapacityResponse, SetProtectedRequest, SetProtectedResponse, SetSuspendedRequest, SetSuspendedResponse,
    report_request, report_response,
};
use prost::Message;
use rustls::pki_types::CertificateDer;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::activity::{Activity, ActivityLog};
use crate::clock::now_ms;
use crate::ingest::{CloseReason, IngestError, IngestHandle, MAX_SAMPLES_PER_BATCH};
use crate::metrics::{ConnectedAgent, Metrics};
use crate::pki::{Authority, CertRejection, ClientIdentity};
use crate::reconcile::{GroupHandle, GroupStatus, Process, Suspended};
use crate::tls::PeerInfo;

pub use crate::transport::limits::MAX_MESSAGE_BYTES;

/// The verified identity behind a request, or the refusal as a gRPC status (counted under `service`).
fn identify<T>(
    request: &Request<T>,
    authority: &Authority,
    metrics: &Metrics,
    service: &'static str,
) -> Result<ClientIdentity, Status> {
    identify_chain(&peer_certs(request), authority, metrics, service)
}

/// The client's certificate chain as the TLS layer saw it (leaf first; empty without one), not yet verified.
fn peer_certs<T>(request: &Request<T>) -> Arc<Vec<CertificateDer<'static>>> {
    request
        .extensions()
        .get::<PeerInfo>()
        .map(|p| p.certs.clone())
        .unwrap_or_default()
}

/// The verified identity behind a certificate chain (leaf first), or the refusal.
fn identify_chain(
    certs: &[CertificateDer<'static>],
    authority: &Authority,
    metrics: &Metrics,
    service: &'static str,
) -> Result<ClientIdentity, Status> {
    let refuse = |rejection: CertRejection| {
        metrics.refused(service, rejection.reason);
        Status::unauthenticated(rejection.message)
    };
    let identity = authority.pki.verify_client(certs, now_ms()).map_err(refuse)?;
    if let ClientIdentity::Member { member_id, serial, .. } = &identity
        && !authority.is_current(member_id, serial)
    {
        return Err(refuse(CertRejection {
            reason: "revoked_certificate",
            message: format!("the certificate of member {member_id} has been revoked or replaced"),
        }));
    }
    Ok(identity)
}

/// tonic's refusal of a message over [`MAX_MESSAGE_BYTES`].
pub fn is_oversized(status: &Status) -> bool {
    status.code() == tonic::Code::OutOfRange && status.message().contains("message length too large")
}

/// How the ingest task's refusal reaches the agent.
fn ingest_status(e: &IngestError) -> Status {
    match e {
        IngestError::UnknownMember(_) => Status::permission_denied(e.to_string()),
        IngestError::Superseded { .. } => Status::aborted(e.to_string()),
        IngestError::Closed => Status::unavailable(e.to_string()),
    }
}

fn refuse(metrics: &Metrics, service: &'static str, reason: &'static str, status: Status) -> Status {
    metrics.refused(service, reason);
    status
}

pub struct TelemetryService {
    pub ingest: IngestHandle,
    pub metrics: Arc<Metrics>,
    pub authority: Arc<Authority>,
    /// Becomes true when the collector stops: the connections [`serve_report_connection`] holds close then.
    pub stopping: watch::Receiver<bool>,
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<ReportResponse, Status>> + Send>>;

/// Answers queued on one Report stream for the agent to read.
const ANSWERS_QUEUED: usize = 8;

fn ack(highest_seq: u64, rejected: Vec<ebb_proto::v1::Rejection>) -> ReportResponse {
    ReportResponse {
        message: Some(report_response::Message::Ack(Ack { highest_seq, rejected })),
    }
}

/// An ack no larger than the request it answers (`request_bytes`, a few bytes of framing aside): the
/// rejections that fit are listed, the rest are counted in the metrics only. A batch of many bad samples
/// cannot make the collector send more than it received.
pub(crate) fn bounded_ack(
    highest_seq: u64,
    rejected: Vec<ebb_proto::v1::Rejection>,
    request_bytes: usize,
) -> ReportResponse {
    // The wrapper's length prefixes may grow by a few bytes as rejections are added.
    let mut bytes = ack(highest_seq, Vec::new()).encoded_len() + 4;
    let listed = rejected
        .into_iter()
        .take_while(|rejection| {
            let length = rejection.encoded_len();
            bytes += 1 + prost::length_delimiter_len(length) + length;
            bytes <= request_bytes
        })
        .collect();
    ack(highest_seq, listed)
}

/// A Report stream's next message within this many of the agent's sampling intervals, and at least
/// [`REPORT_MESSAGE_DEADLINE`]: a live agent sends a batch every interval, so a stream that sends nothing
/// (or trickles a message in) for longer holds a connection for nothing.
const REPORT_MESSAGE_INTERVALS: u32 = 5;
pub const REPORT_MESSAGE_DEADLINE: Duration = Duration::from_secs(15);

/// One agent's Report stream once its certificate and Hello are accepted: samples go to the ingest task,
/// acks and settings come back.
pub struct ReportSession {
    member: String,
    run_id: u64,
    settings: AgentSettings,
    closed: watch::Receiver<Option<CloseReason>>,
    ingest: IngestHandle,
    _connected: ConnectedAgent,
}

impl TelemetryService {
    /// The member a certificate chain may report as, or the refusal.
    pub fn authorize(&self, certs: &[CertificateDer<'static>]) -> Result<String, Status> {
        match identify_chain(certs, &self.authority, &self.metrics, "report")? {
            ClientIdentity::Member { member_id, .. } => Ok(member_id),
            ClientIdentity::Admin { .. } => Err(refuse(
                &self.metrics,
                "report",
                "not_a_member",
                Status::permission_denied("an admin certificate cannot report samples"),
            )),
        }
    }

    /// Opens the stream of `certified` with its first message, which must be its Hello; returns the session
    /// and the first responses (the agent's settings, then the highest sequence already stored).
    pub async fn open(
        &self,
        certified: String,
        first: Option<ReportRequest>,
    ) -> Result<(ReportSession, [ReportResponse; 2]), Status> {
        let Some(ReportRequest {
            message: Some(report_request::Message::Hello(hello)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "the first message of a Report stream must be a Hello",
            ));
        };
        if hello.member_id != certified {
            return Err(refuse(
                &self.metrics,
                "report",
                "impersonation",
                Status::permission_denied(format!(
                    "this certificate belongs to member {certified}; it cannot report as {}",
                    hello.member_id
                )),
            ));
        }
        let run_id = hello.run_id;
        let accepted = self.ingest.hello(hello).await.map_err(|e| {
            if matches!(e, IngestError::UnknownMember(_)) {
                self.metrics.refused("report", "unknown_member");
            }
            ingest_status(&e)
        })?;
        tracing::debug!(member = %certified, "Agent connected.");
        let first = [
            ReportResponse {
                message: Some(report_response::Message::Settings(accepted.settings.clone())),
            },
            ack(accepted.highest_seq, Vec::new()),
        ];
        let session = ReportSession {
            member: certified,
            run_id,
            settings: accepted.settings,
            closed: accepted.closed,
            ingest: self.ingest.clone(),
            _connected: self.metrics.agent_connected(),
        };
        Ok((session, first))
    }
}

impl ReportSession {
    /// Takes one message after the Hello; the responses to it, or the status that ends the stream.
    pub async fn receive(&mut self, message: ReportRequest) -> Result<Vec<ReportResponse>, Status> {
        let request_bytes = message.encoded_len();
        let Some(report_request::Message::Batch(batch)) = message.message else {
            return Err(Status::invalid_argument(
                "only one Hello per stream; then sample batches",
            ));
        };
        if batch.samples.len() > MAX_SAMPLES_PER_BATCH {
            return Err(Status::invalid_argument(format!(
                "a batch holds at most {MAX_SAMPLES_PER_BATCH} samples; this one held {}",
                batch.samples.len()
            )));
        }
        let outcome = self
            .ingest
            .batch(&self.member, self.run_id, batch.samples, now_ms())
            .await
            .map_err(|e| ingest_status(&e))?;
        let mut responses = vec![bounded_ack(outcome.highest_seq, outcome.rejected, request_bytes)];
        // Settings may change after launch (the health-check URL is known once the instance has an
        // address); an agent connected earlier hears about it here.
        if let Some(current) = outcome.settings
            && current != self.settings
        {
            self.settings = current.clone();
            responses.push(ReportResponse {
                message: Some(report_response::Message::Settings(current)),
            });
        }
        Ok(responses)
    }

    /// Resolves when the stream must close (the member's certificate revoked, the member removed, another
    /// run of its agent took over): the status to end with.
    pub async fn closed(&mut self) -> Status {
        let reason = match self.closed.wait_for(Option::is_some).await {
            Ok(reason) => *reason,
            // The member's record is gone with the sender.
            Err(_) => Some(CloseReason::Revoked),
        };
        match reason {
            Some(CloseReason::Superseded { current_run }) => Status::aborted(format!(
                "member {}: another agent run (run id {current_run}) took over this stream; reconnect to report",
                self.member
            )),
            _ => Status::permission_denied("this member's certificate was revoked or the member was removed"),
        }
    }

    /// How long the stream may wait for the agent's next message.
    fn message_deadline(&self) -> Duration {
        (Duration::from_secs(self.settings.interval_secs.into()) * REPORT_MESSAGE_INTERVALS)
            .max(REPORT_MESSAGE_DEADLINE)
    }
}

impl Drop for ReportSession {
    fn drop(&mut self) {
        tracing::debug!(member = %self.member, "Agent disconnected.");
    }
}

#[tonic::async_trait]
impl Telemetry for TelemetryService {
    type ReportStream = ResponseStream;

    async fn report(&self, request: Request<Streaming<ReportRequest>>) -> Result<Response<Self::ReportStream>, Status> {
        let certified = self.authorize(&peer_certs(&request))?;
        let mut inbound = request.into_inner();
        let first = inbound.message().await?;
        let (mut session, first) = self.open(certified, first).await?;
        let (responses, outgoing) = mpsc::channel(ANSWERS_QUEUED);
        for response in first {
            let _ = responses.try_send(Ok(response));
        }
        let metrics = self.metrics.clone();
        let mut stopping = self.stopping.clone();
        tokio::spawn(async move {
            let ended = loop {
                let message = tokio::select! {
                    message = tokio::time::timeout(session.message_deadline(), inbound.message()) => match message {
                        Ok(Ok(Some(message))) => message,
                        Ok(Ok(None)) => return,
                        Ok(Err(status)) => {
                            if is_oversized(&status) {
                                metrics.refused("report", "oversized_message");
                            }
                            break status;
                        }
                        Err(_) => {
                            metrics.refused("report", "message_deadline");
                            break Status::deadline_exceeded(format!(
                                "no complete message within {} s; an agent sends one every sampling interval",
                                session.message_deadline().as_secs()
                            ));
                        }
                    },
                    status = session.closed() => break status,
                    _ = stopping.wait_for(|stopping| *stopping) => break Status::unavailable("the collector is stopping"),
                };
                let answers = match session.receive(message).await {
                    Ok(answers) => answers,
                    Err(status) => break status,
                };
                for answer in answers {
                    // An agent that does not read its acks holds the stream for nothing.
                    match tokio::time::timeout(REPORT_MESSAGE_DEADLINE, responses.send(Ok(answer))).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return,
                        Err(_) => {
                            metrics.refused("report", "unread_answers");
                            return;
                        }
                    }
                }
            };
            let _ = responses.try_send(Err(ended));
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(outgoing))))
    }
}

/// A controller's refusal as the gRPC status an operator's tool (or an enrolling agent) acts on:
/// `UNAVAILABLE` is retried, `NOT_FOUND` and `FAILED_PRECONDITION` are not.
fn control_status(error: crate::reconcile::ControlError) -> Status {
    use crate::reconcile::ControlError;
    let message = error.to_string();
    match error {
        ControlError::Stopped | ControlError::Unavailable(_) => Status::unavailable(message),
        ControlError::NotFound(_) => Status::not_found(message),
        ControlError::Refused(_) => Status::failed_precondition(message),
    }
}

pub struct EnrollmentService {
    pub authority: Arc<Authority>,
    pub metrics: Arc<Metrics>,
    pub groups: Arc<crate::groups::Groups>,
}

#[tonic::async_trait]
impl Enrollment for EnrollmentService {
    async fn enroll(&self, request: Request<EnrollRequest>) -> Result<Response<EnrollResponse>, Status> {
        let now = now_ms();
        if let Some(address) = request
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.remote)
            .map(|r| r.ip())
        {
            let limits = &self.authority.enrollments;
            if let Err(refusal) = limits.check(address, now) {
                let (reason, message) = match refusal {
                    crate::pki::rate::Refusal::Key => (
                        "rate_limited",
                        format!(
                            "more than {} enrolment attempts from {address} this minute",
                            limits.per_key()
                        ),
                    ),
                    crate::pki::rate::Refusal::Total => (
                        "rate_limited_total",
                        format!(
                            "the collector takes at most {} enrolment attempts a minute",
                            limits.total()
                        ),
                    ),
                };
                let status = Status::resource_exhausted(format!("{message}; retry later"));
                return Err(refuse(&self.metrics, "enroll", reason, status));
            }
        }
        let request = request.into_inner();
        // A use of the token is held now and spent only once the member has its certificate.
        let redemption = self
            .authority
            .tokens
            .redeem(&request.token, &request.group, now)
            .map_err(|rejection| {
                refuse(
                    &self.metrics,
                    "enroll",
                    rejection.reason,
                    Status::permission_denied(rejection.message),
                )
            })?;
        let token = redemption.token().clone();
        let facts = request.facts.unwrap_or_default();
        let (member_id, joined) = match &token.bound_member {
            Some(member_id) => (member_id.clone(), None),
            None => {
                let group = self
                    .groups
                    .get(&token.group)
                    .ok_or_else(|| Status::failed_precondition(format!("group {} no longer exists", token.group)))?;
                let member_id = group
                    .join_external(facts.clone(), token.protected)
                    .await
                    .map_err(control_status)?;
                (member_id, Some(group))
            }
        };
        let issued = match self
            .authority
            .pki
            .issue_member(&request.csr_der, &token.group, &member_id, now)
        {
            Ok(issued) => issued,
            Err(e) => {
                if let Some(group) = joined {
                    group.leave_external(&member_id).await;
                }
                return Err(refuse(
                    &self.metrics,
                    "enroll",
                    "bad_csr",
                    Status::invalid_argument(e.to_string()),
                ));
            }
        };
        self.authority.record_issued(&member_id, &issued.serial);
        redemption.spend();
        self.metrics.enrolled();
        tracing::info!(group = %token.group, member = %member_id, hostname = %facts.hostname, instance = %facts.instance_id, token = %token.id, "Enrolled a member.");
        Ok(Response::new(EnrollResponse {
            member_id: member_id.clone(),
            group: token.group,
            certificate_pem: issued.pem,
            ca_certificate_pem: self.authority.pki.ca_pem().to_string(),
            not_after_ms: issued.not_after_ms,
        }))
    }

    async fn renew(&self, request: Request<RenewRequest>) -> Result<Response<RenewResponse>, Status> {
        let ClientIdentity::Member { group, member_id, .. } =
            identify(&request, &self.authority, &self.metrics, "renew")?
        else {
            return Err(refuse(
                &self.metrics,
                "renew",
                "not_a_member",
                Status::permission_denied("only members renew their certificates"),
            ));
        };
        if self.authority.renewals.check(member_id.clone(), now_ms()).is_err() {
            return Err(refuse(
                &self.metrics,
                "renew",
                "rate_limited",
                Status::resource_exhausted(format!(
                    "member {member_id} renewed {} times this hour; an agent renews a few times a day, retry later",
                    crate::pki::RENEWALS_PER_HOUR
                )),
            ));
        }
        let issued = self
            .authority
            .pki
            .issue_member(&request.get_ref().csr_der, &group, &member_id, now_ms())
            .map_err(|e| {
                refuse(
                    &self.metrics,
                    "renew",
                    "bad_csr",
                    Status::invalid_argument(e.to_string()),
                )
            })?;
        self.authority.record_issued(&member_id, &issued.serial);
        tracing::debug!(member = %member_id, "Renewed a member's certificate.");
        Ok(Response::new(RenewResponse {
            certificate_pem: issued.pem,
            not_after_ms: issued.not_after_ms,
        }))
    }
}

/// Lets a request through to the Admin API only with an admin certificate from this CA. It wraps the
/// whole service, so that no method can forget it.
/// The Admin API listeners answer nothing, reflection and health included, without an admin certificate.
pub fn admin_gate(authority: Arc<Authority>, metrics: Arc<Metrics>) -> crate::transport::Gate {
    Arc::new(
        move |peer: &PeerInfo, _path: &str| match identify_chain(&peer.certs, &authority, &metrics, "admin")? {
            ClientIdentity::Admin { .. } => Ok(()),
            ClientIdentity::Member { member_id, .. } => Err(refuse(
                &metrics,
                "admin",
                "not_an_admin",
                Status::permission_denied(format!("member {member_id}'s certificate cannot use the Admin API")),
            )),
        },
    )
}

/// The agents' port serves Telemetry, Enrollment, health and reflection; an Admin call there is told where
/// the Admin API is.
pub fn agents_gate(
    admin_socket: std::path::PathBuf,
    admin_address: Option<std::net::SocketAddr>,
) -> crate::transport::Gate {
    let where_admin = match admin_address {
        Some(address) => format!(
            "the Unix socket {} or {address} (server.admin_listen)",
            admin_socket.display()
        ),
        None => format!(
            "the Unix socket {} (or set server.admin_listen to serve it on TCP)",
            admin_socket.display()
        ),
    };
    Arc::new(move |_peer: &PeerInfo, path: &str| {
        if path.starts_with("/ebb.v1.Admin/") {
            return Err(Status::unimplemented(format!(
                "the Admin API is not served on the agents' port; it is on {where_admin}, with an admin certificate"
            )));
        }
        Ok(())
    })
}

pub struct AdminService {
    pub groups: Arc<crate::groups::Groups>,
    pub activities: ActivityLog,
    pub explanations: crate::explain::ExplanationLog,
    pub reloader: Arc<crate::reload::Reloader>,
    pub authority: Arc<Authority>,
    pub ingest: IngestHandle,
}

fn token_to_proto(token: &crate::pki::tokens::Token) -> JoinToken {
    JoinToken {
        id: token.id.clone(),
        group: token.group.clone(),
        expires_at_ms: token.expires_at,
        uses_left: token.uses_left,
        protected: token.protected,
        bound_member_id: token.bound_member.clone().unwrap_or_default(),
    }
}

impl AdminService {
    fn group(&self, name: &str) -> Result<GroupHandle, Status> {
        self.groups.get(name).ok_or_else(|| {
            Status::not_found(format!(
                "no group named `{name}`; the groups are: {}",
                self.groups.names().join(", ")
            ))
        })
    }
}

pub fn group_to_proto(status: &GroupStatus) -> ebb_proto::v1::Group {
    ebb_proto::v1::Group {
        name: status.name.clone(),
        min_size: status.min_size,
        max_size: status.max_size,
        desired_capacity: status.desired,
        in_service: status.in_service(),
        pending: status.pending(),
        cpu_avg_percent: status.cpu_avg,
        last_evaluation: status.last_evaluation.clone(),
    }
}

pub fn activity_to_proto(activity: &Activity) -> ebb_proto::v1::Activity {
    ebb_proto::v1::Activity {
        id: activity.id,
        group: activity.group.clone(),
        kind: activity.kind.as_str().to_string(),
        cause: activity.cause.clone(),
        outcome: activity.outcome.to_string(),
        detail: activity.detail.clone(),
        at_ms: activity.at,
        from_capacity: activity.from_capacity,
        to_capacity: activity.to_capacity,
        member_id: activity.member_id.clone(),
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_groups(&self, _: Request<ListGroupsRequest>) -> Result<Response<ListGroupsResponse>, Status> {
        Ok(Response::new(ListGroupsResponse {
            groups: self
                .groups
                .all()
                .iter()
                .map(|(_, g)| group_to_proto(&g.status()))
                .collect(),
        }))
    }

    async fn list_members(
        &self,
        request: Request<ListMembersRequest>,
    ) -> Result<Response<ListMembersResponse>, Status> {
        let status = self.group(&request.get_ref().group)?.status();
        let members = status
            .members
            .iter()
            .map(|m| ebb_proto::v1::Member {
                id: m.member.id.clone(),
                group: status.name.clone(),
                instance_id: m.member.instance_id.clone(),
                address: m.member.address.map(|a| a.to_string()).unwrap_or_default(),
                state: m.member.state_name().to_string(),
                launched_at_ms: m.member.launched_at,
                cpu_busy_percent: m.latest.as_ref().and_then(|l| l.cpu_busy_percent),
                load1: m.latest.as_ref().map(|l| l.load1),
                health: m.latest.as_ref().map(|l| l.health.clone()),
                last_sample_at_ms: m.latest.as_ref().map_or(0, |l| l.at),
                lb_connections: m.lb_connections,
                protected: m.member.protected,
            })
            .collect();
        Ok(Response::new(ListMembersResponse { members }))
    }

    async fn list_activities(
        &self,
        request: Request<ListActivitiesRequest>,
    ) -> Result<Response<ListActivitiesResponse>, Status> {
        let request = request.into_inner();
        if !request.group.is_empty() {
            self.group(&request.group)?;
        }
        let limit = if request.limit == 0 {
            100
        } else {
            request.limit as usize
        };
        Ok(Response::new(ListActivitiesResponse {
            activities: self
                .activities
                .newest(&request.group, limit)
                .iter()
                .map(activity_to_proto)
                .collect(),
        }))
    }

    async fn set_desired_capacity(
        &self,
        request: Request<SetDesiredCapacityRequest>,
    ) -> Result<Response<SetDesiredCapacityResponse>, Status> {
        let request = request.into_inner();
        let status = self
            .group(&request.group)?
            .set_desired(request.desired_capacity)
            .await
            .map_err(control_status)?;
        Ok(Response::new(SetDesiredCapacityResponse {
            group: Some(group_to_proto(&status)),
        }))
    }

    async fn create_token(
        &self,
        request: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let request = request.into_inner();
        self.group(&request.group)?;
        if request.ttl_secs == 0 || request.uses == 0 {
            return Err(Status::invalid_argument("a token needs ttl_secs >= 1 and uses >= 1"));
        }
        let (secret, token) = self.authority.tokens.create(
            &request.group,
            now_ms(),
            request.ttl_secs,
            request.uses,
            request.protected,
            None,
        );
        tracing::info!(group = %token.group, token = %token.id, uses = token.uses_left, "Created a join token.");
        Ok(Response::new(CreateTokenResponse {
            token: secret,
            info: Some(token_to_proto(&token)),
        }))
    }

    async fn list_tokens(&self, _: Request<ListTokensRequest>) -> Result<Response<ListTokensResponse>, Status> {
        Ok(Response::new(ListTokensResponse {
            tokens: self
                .authority
                .tokens
                .list(now_ms())
                .iter()
                .map(token_to_proto)
                .collect(),
        }))
    }

    async fn revoke_token(
        &self,
        request: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        if self.authority.tokens.revoke(&request.get_ref().id) {
            Ok(Response::new(RevokeTokenResponse {}))
        } else {
            Err(Status::not_found(format!("no token with id {}", request.get_ref().id)))
        }
    }

    async fn revoke_member(
        &self,
        request: Request<RevokeMemberRequest>,
    ) -> Result<Response<RevokeMemberResponse>, Status> {
        let member_id = &request.get_ref().member_id;
        if !self.authority.revoke_member(member_id) {
            return Err(Status::not_found(format!(
                "member {member_id} has no certificate to revoke"
            )));
        }
        self.ingest.disconnect(member_id).await;
        tracing::warn!(member = %member_id, "Revoked a member's certificate.");
        Ok(Response::new(RevokeMemberResponse {}))
    }

    async fn set_protected(
        &self,
        request: Request<SetProtectedRequest>,
    ) -> Result<Response<SetProtectedResponse>, Status> {
        let SetProtectedRequest { member_id, protected } = request.into_inner();
        let Some((name, group)) = self
            .groups
            .all()
            .into_iter()
            .find(|(_, group)| group.status().members.iter().any(|m| m.member.id == member_id))
        else {
            return Err(Status::not_found(format!("no group has a member {member_id}")));
        };
        group
            .set_protected(&member_id, protected)
            .await
            .map_err(control_status)?;
        Ok(Response::new(SetProtectedResponse { group: name }))
    }

    async fn explain(&self, request: Request<ExplainRequest>) -> Result<Response<ExplainResponse>, Status> {
        let request = request.into_inner();
        self.group(&request.group)?;
        let limit = if request.limit == 0 { 20 } else { request.limit as usize };
        let explanations = self
            .explanations
            .since(&request.group, request.since_ms, limit)
            .into_iter()
            .map(|r| Explanation {
                from_ms: r.from,
                until_ms: r.until,
                evaluations: r.evaluations,
                action: r.action,
                reason: r.reason,
                desired_before: r.desired_before,
                desired: r.desired,
                dry_run: r.dry_run,
                json: r.json,
                text: r.text,
            })
            .collect();
        Ok(Response::new(ExplainResponse { explanations }))
    }

    async fn refresh(&self, request: Request<RefreshRequest>) -> Result<Response<RefreshResponse>, Status> {
        let request = request.into_inner();
        let percent = match request.min_healthy_percent {
            0 => 90,
            p if p > 100 => return Err(Status::invalid_argument("min_healthy_percent is at most 100")),
            p => p,
        };
        let outdated = self
            .group(&request.group)?
            .refresh(percent)
            .await
            .map_err(control_status)?;
        Ok(Response::new(RefreshResponse { outdated }))
    }

    async fn reload(&self, _request: Request<ReloadRequest>) -> Result<Response<ReloadResponse>, Status> {
        let changes = self.reloader.reload().await.map_err(Status::failed_precondition)?;
        tracing::info!(changes = ?changes, "Reloaded the configuration.");
        Ok(Response::new(ReloadResponse { changes }))
    }

    async fn set_suspended(
        &self,
        request: Request<SetSuspendedRequest>,
    ) -> Result<Response<SetSuspendedResponse>, Status> {
        let request = request.into_inner();
        let group = self.group(&request.group)?;
        let processes = if request.processes.is_empty() {
            Suspended::ALL
        } else {
            let parsed: Result<Vec<Process>, String> = request.processes.iter().map(|p| Process::parse(p)).collect();
            Suspended::of(&parsed.map_err(Status::invalid_argument)?)
        };
        let now = group
            .set_suspended(processes, request.suspended)
            .await
            .map_err(control_status)?;
        Ok(Response::new(SetSuspendedResponse {
            suspended: now.names().into_iter().map(str::to_string).collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::ControlError;

    #[test]
    fn a_controllers_refusals_become_the_status_codes_clients_act_on() {
        let code = |error| control_status(error).code();
        assert_eq!(code(ControlError::Stopped), tonic::Code::Unavailable, "retried later");
        assert_eq!(
            code(ControlError::Unavailable("disk full".into())),
            tonic::Code::Unavailable
        );
        assert_eq!(
            code(ControlError::NotFound("no member web-9".into())),
            tonic::Code::NotFound
        );
        assert_eq!(
            code(ControlError::Refused("at max_size".into())),
            tonic::Code::FailedPrecondition
        );
        assert_eq!(
            control_status(ControlError::Stopped).message(),
            "the group's controller has stopped"
        );
    }
}
