//! The gRPC edge: the Telemetry and Admin services. Handlers only forward to the ingest task and the
//! group controllers and turn their answers into protobuf; errors become `tonic::Status` here and only
//! here, with a message an operator can act on.

use std::collections::BTreeMap;
use std::future::Future;
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
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::activity::{Activity, ActivityLog};
use crate::http2;
use crate::ingest::{IngestError, IngestHandle};
use crate::metrics::{ConnectedAgent, Metrics};
use crate::pki::{Authority, CertRejection, ClientIdentity};
use crate::reconcile::{GroupHandle, GroupStatus, Process, Suspended, now_ms};
use crate::tls::{PeerInfo, TlsConnection};

/// Largest message accepted from anyone; a batch of 100 samples is about 10 KB.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

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
fn is_oversized(status: &Status) -> bool {
    status.code() == tonic::Code::OutOfRange && status.message().contains("message length too large")
}

/// Counts unary requests that tonic refused for their size before any handler ran (it answers with
/// `grpc-status` 11 in the response headers).
pub fn count_oversized(
    metrics: Arc<Metrics>,
) -> impl Fn(tonic::codegen::http::Response<tonic::body::Body>) -> tonic::codegen::http::Response<tonic::body::Body> + Clone
{
    move |response| {
        if Status::from_header_map(response.headers()).is_some_and(|status| is_oversized(&status)) {
            metrics.refused("grpc", "oversized_message");
        }
        response
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

fn ack(highest_seq: u64, rejected: Vec<ebb_proto::v1::Rejection>) -> ReportResponse {
    ReportResponse {
        message: Some(report_response::Message::Ack(Ack { highest_seq, rejected })),
    }
}

/// One agent's Report stream once its certificate and Hello are accepted, whichever HTTP/2 server carries
/// it ([`http2`](crate::http2) for agents, tonic for anything else): samples go to the ingest task, acks
/// and settings come back.
pub struct ReportSession {
    member: String,
    run_id: u64,
    settings: AgentSettings,
    closed: watch::Receiver<bool>,
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
        let accepted = self.ingest.hello(hello).await.map_err(|e| match e {
            IngestError::UnknownMember(_) => refuse(
                &self.metrics,
                "report",
                "unknown_member",
                Status::permission_denied(e.to_string()),
            ),
            IngestError::Closed => Status::unavailable(e.to_string()),
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

    /// Counts and describes a message over [`MAX_MESSAGE_BYTES`].
    fn oversized(&self, length: usize) -> Status {
        self.metrics.refused("report", "oversized_message");
        Status::out_of_range(format!(
            "message length too large: found {length} bytes, the limit is {MAX_MESSAGE_BYTES} bytes"
        ))
    }
}

impl ReportSession {
    /// Takes one message after the Hello; the responses to it, or the status that ends the stream.
    pub async fn receive(&mut self, message: ReportRequest) -> Result<Vec<ReportResponse>, Status> {
        let Some(report_request::Message::Batch(batch)) = message.message else {
            return Err(Status::invalid_argument(
                "only one Hello per stream; then sample batches",
            ));
        };
        let outcome = self
            .ingest
            .batch(&self.member, self.run_id, batch.samples, now_ms())
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let mut responses = vec![ack(outcome.highest_seq, outcome.rejected)];
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

    /// Resolves when the member's certificate is revoked or the member removed: the status to end with.
    pub async fn revoked(&mut self) -> Status {
        let _ = self.closed.wait_for(|closed| *closed).await;
        Status::permission_denied("this member's certificate was revoked or the member was removed")
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
        let (responses, outgoing) = mpsc::channel(16);
        for response in first {
            let _ = responses.send(Ok(response)).await;
        }
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    message = inbound.message() => match message {
                        Ok(Some(message)) => message,
                        Ok(None) => break,
                        Err(status) => {
                            if is_oversized(&status) {
                                metrics.refused("report", "oversized_message");
                            }
                            break;
                        }
                    },
                    status = session.revoked() => {
                        let _ = responses.send(Err(status)).await;
                        break;
                    }
                };
                match session.receive(message).await {
                    Ok(answers) => {
                        for answer in answers {
                            if responses.send(Ok(answer)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(status) => {
                        let _ = responses.send(Err(status)).await;
                        break;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(outgoing))))
    }
}

/// The path of `Telemetry.Report`, the only one [`serve_report_connection`] serves.
pub const REPORT_PATH: &str = "/ebb.v1.Telemetry/Report";

/// How long a member's new connection may take to send its first request before tonic gets it anyway
/// (a client that waits for the server's SETTINGS first, such as grpc-go's, never sends one before).
const FIRST_REQUEST_WAIT: Duration = Duration::from_secs(1);

/// Keeps a member's connection whose first request is Report, to serve it with [`http2`](crate::http2) for
/// as long as the agent stays; gives any other connection back for tonic, with what was read of it.
///
/// Not an `async fn`: the future lives as long as the agent's connection, so it captures the connection
/// once (an `async fn` would keep its argument and the [`http2::Connection`] made of it side by side) and
/// lends it to [`serve_report_connection`].
pub fn divert_reports<Io: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    telemetry: Arc<TelemetryService>,
    connection: TlsConnection<Io>,
) -> Pin<Box<dyn Future<Output = Option<TlsConnection<Io>>> + Send>> {
    let certs = connection.info.certs.clone();
    if !matches!(
        telemetry.authority.pki.verify_client(&certs, now_ms()),
        Ok(ClientIdentity::Member { .. })
    ) {
        return Box::pin(std::future::ready(Some(connection)));
    }
    let mut connection = http2::Connection::new(connection, MAX_MESSAGE_BYTES);
    Box::pin(async move {
        match connection.read_first_request(FIRST_REQUEST_WAIT).await {
            http2::FirstRequest::Path(path) if path == REPORT_PATH => {
                serve_report_connection(&telemetry, &certs, &mut connection).await;
                None
            }
            _ => {
                let (mut connection, read) = connection.into_parts();
                connection.replay = read;
                Some(connection)
            }
        }
    })
}

/// Where a stream on a [`serve_report_connection`] stands.
enum ReportStream {
    /// No stream is open.
    Idle,
    /// The certificate was accepted; the Hello is next.
    Authorized(String),
    Open(ReportSession),
}

/// What woke a [`serve_report_connection`].
enum Wake {
    Event(Result<Option<http2::Event>, http2::Error>),
    Revoked(Status),
    Stopping,
}

/// Resolves when the open stream's member is revoked; never without an open stream.
async fn revoked(stream: &mut ReportStream) -> Status {
    match stream {
        ReportStream::Open(session) => session.revoked().await,
        _ => std::future::pending().await,
    }
}

/// Serves Report streams on one agent's connection until it closes or the collector stops.
pub async fn serve_report_connection<Io: AsyncRead + AsyncWrite + Unpin>(
    telemetry: &TelemetryService,
    certs: &[CertificateDer<'static>],
    connection: &mut http2::Connection<Io>,
) {
    let mut stopping = telemetry.stopping.clone();
    let mut stream = ReportStream::Idle;
    loop {
        let wake = tokio::select! {
            event = connection.next() => Wake::Event(event),
            status = revoked(&mut stream) => Wake::Revoked(status),
            _ = stopping.wait_for(|stopping| *stopping) => Wake::Stopping,
        };
        let event = match wake {
            Wake::Event(Ok(Some(event))) => Ok(event),
            Wake::Event(Ok(None)) => break,
            Wake::Event(Err(e)) => {
                tracing::debug!(error = %e, "Closed an agent's connection.");
                return;
            }
            Wake::Revoked(status) => Err(status),
            Wake::Stopping => {
                connection.finish(tonic::Code::Unavailable as i32, "the collector is stopping");
                break;
            }
        };
        let outcome =
            match (event, std::mem::replace(&mut stream, ReportStream::Idle)) {
                (Ok(http2::Event::Request { path }), _) if path != REPORT_PATH => Err(Status::unimplemented(format!(
                    "{path} is not served on an agent's Report connection"
                ))),
                (Ok(http2::Event::Request { .. }), _) => telemetry.authorize(certs).map(|member| {
                    stream = ReportStream::Authorized(member);
                }),
                (Ok(http2::Event::Message(bytes)), previous) => match ReportRequest::decode(bytes.as_slice()) {
                    Err(e) => Err(Status::invalid_argument(format!("cannot decode a ReportRequest: {e}"))),
                    Ok(message) => match previous {
                        // Boxed, as is `receive`: the future of a connection that waits for its next sample
                        // then holds only a pointer to them.
                        ReportStream::Authorized(member) => Box::pin(telemetry.open(member, Some(message)))
                            .await
                            .and_then(|(session, first)| {
                                stream = ReportStream::Open(session);
                                first.iter().try_for_each(|response| send(connection, response))
                            }),
                        ReportStream::Open(mut session) => match Box::pin(session.receive(message)).await {
                            Ok(responses) => {
                                stream = ReportStream::Open(session);
                                responses.iter().try_for_each(|response| send(connection, response))
                            }
                            Err(status) => Err(status),
                        },
                        ReportStream::Idle => Ok(()),
                    },
                },
                (Ok(http2::Event::TooLarge { length }), _) => Err(telemetry.oversized(length)),
                (Ok(http2::Event::Compressed), _) => Err(Status::unimplemented(
                    "compressed messages are not accepted; send them uncompressed",
                )),
                (Ok(http2::Event::Finished), ReportStream::Authorized(_)) => Err(Status::invalid_argument(
                    "the first message of a Report stream must be a Hello",
                )),
                (Ok(http2::Event::Finished | http2::Event::Reset), _) => Ok(()),
                // Revoked (or removed) while its stream was open.
                (Err(status), _) => Err(status),
            };
        match outcome {
            Err(status) => {
                stream = ReportStream::Idle;
                connection.finish(status.code() as i32, status.message());
            }
            // The client finished (or reset) its side: so do we.
            Ok(()) if matches!(stream, ReportStream::Idle) => connection.finish(0, ""),
            Ok(()) => {}
        }
        if connection.flush().await.is_err() {
            return;
        }
    }
    connection.close().await;
}

/// Queues one response; a client that stopped reading its responses ends the stream.
fn send<Io: AsyncRead + AsyncWrite + Unpin>(
    connection: &mut http2::Connection<Io>,
    response: &ReportResponse,
) -> Result<(), Status> {
    connection
        .send(&response.encode_to_vec())
        .map_err(|e| Status::resource_exhausted(e.to_string()))
}

pub struct EnrollmentService {
    pub authority: Arc<Authority>,
    pub metrics: Arc<Metrics>,
    pub groups: BTreeMap<String, GroupHandle>,
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
            && !self.authority.allow_enrollment(address, now)
        {
            return Err(refuse(
                &self.metrics,
                "enroll",
                "rate_limited",
                Status::resource_exhausted(format!(
                    "more than {} enrolment attempts from {} this minute; retry later",
                    self.authority.enrollments_per_minute, address
                )),
            ));
        }
        let request = request.into_inner();
        let token = self
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
                    .map_err(Status::failed_precondition)?;
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
pub fn require_admin(
    authority: Arc<Authority>,
    metrics: Arc<Metrics>,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |request| match identify(&request, &authority, &metrics, "admin")? {
        ClientIdentity::Admin { .. } => Ok(request),
        ClientIdentity::Member { member_id, .. } => Err(refuse(
            &metrics,
            "admin",
            "not_an_admin",
            Status::permission_denied(format!("member {member_id}'s certificate cannot use the Admin API")),
        )),
    }
}

pub struct AdminService {
    pub groups: BTreeMap<String, GroupHandle>,
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
    fn group(&self, name: &str) -> Result<&GroupHandle, Status> {
        self.groups.get(name).ok_or_else(|| {
            Status::not_found(format!(
                "no group named `{name}`; the groups are: {}",
                self.groups.keys().cloned().collect::<Vec<_>>().join(", ")
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
            groups: self.groups.values().map(|g| group_to_proto(&g.status())).collect(),
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
            .map_err(Status::failed_precondition)?;
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
            .iter()
            .find(|(_, group)| group.status().members.iter().any(|m| m.member.id == member_id))
        else {
            return Err(Status::not_found(format!("no group has a member {member_id}")));
        };
        group
            .set_protected(&member_id, protected)
            .await
            .map_err(Status::failed_precondition)?;
        Ok(Response::new(SetProtectedResponse { group: name.clone() }))
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
            .map_err(Status::unavailable)?;
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
            .map_err(Status::unavailable)?;
        Ok(Response::new(SetSuspendedResponse {
            suspended: now.names().into_iter().map(str::to_string).collect(),
        }))
    }
}
