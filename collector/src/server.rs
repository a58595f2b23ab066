//! The gRPC edge: the Telemetry and Admin services. Handlers only forward to the ingest task and the
//! group controllers and turn their answers into protobuf; errors become `tonic::Status` here and only
//! here, with a message an operator can act on.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use ebb_proto::v1::admin_server::Admin;
use ebb_proto::v1::telemetry_server::Telemetry;
use ebb_proto::v1::{
    Ack, ListActivitiesRequest, ListActivitiesResponse, ListGroupsRequest, ListGroupsResponse,
    ListMembersRequest, ListMembersResponse, ReportRequest, ReportResponse,
    SetDesiredCapacityRequest, SetDesiredCapacityResponse, report_request, report_response,
};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::activity::{Activity, ActivityLog};
use crate::ingest::{IngestError, IngestHandle};
use crate::metrics::Metrics;
use crate::reconcile::{GroupHandle, GroupStatus, now_ms};

pub struct TelemetryService {
    pub ingest: IngestHandle,
    pub metrics: Arc<Metrics>,
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<ReportResponse, Status>> + Send>>;

fn ack(
    highest_seq: u64,
    rejected: Vec<ebb_proto::v1::Rejection>,
) -> Result<ReportResponse, Status> {
    Ok(ReportResponse {
        message: Some(report_response::Message::Ack(Ack {
            highest_seq,
            rejected,
        })),
    })
}

#[tonic::async_trait]
impl Telemetry for TelemetryService {
    type ReportStream = ResponseStream;

    async fn report(
        &self,
        request: Request<Streaming<ReportRequest>>,
    ) -> Result<Response<Self::ReportStream>, Status> {
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await? {
            Some(ReportRequest {
                message: Some(report_request::Message::Hello(hello)),
            }) => hello,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of a Report stream must be a Hello",
                ));
            }
        };
        let member = hello.member_id.clone();
        let run_id = hello.run_id;
        let (highest_seq, settings) = self.ingest.hello(hello).await.map_err(|e| match e {
            IngestError::UnknownMember(_) => Status::permission_denied(e.to_string()),
            IngestError::Closed => Status::unavailable(e.to_string()),
        })?;
        tracing::debug!(member = %member, "Agent connected.");

        let (responses, outgoing) = mpsc::channel(16);
        let _ = responses
            .send(Ok(ReportResponse {
                message: Some(report_response::Message::Settings(settings.clone())),
            }))
            .await;
        let _ = responses.send(ack(highest_seq, Vec::new())).await;
        let ingest = self.ingest.clone();
        let connected = self.metrics.agent_connected();
        tokio::spawn(async move {
            let _connected = connected;
            let mut settings = settings;
            loop {
                let message = match inbound.message().await {
                    Ok(Some(message)) => message,
                    Ok(None) | Err(_) => break,
                };
                let Some(report_request::Message::Batch(batch)) = message.message else {
                    let _ = responses
                        .send(Err(Status::invalid_argument(
                            "only one Hello per stream; then sample batches",
                        )))
                        .await;
                    break;
                };
                let outcome = match ingest.batch(&member, run_id, batch.samples, now_ms()).await {
                    Ok(outcome) => outcome,
                    Err(e) => {
                        let _ = responses
                            .send(Err(Status::unavailable(e.to_string())))
                            .await;
                        break;
                    }
                };
                if responses
                    .send(ack(outcome.highest_seq, outcome.rejected))
                    .await
                    .is_err()
                {
                    break;
                }
                // Settings may change after launch (the health-check URL is known once the instance has an
                // address); an agent connected earlier hears about it here.
                if let Some(current) = outcome.settings
                    && current != settings
                {
                    settings = current.clone();
                    let update = ReportResponse {
                        message: Some(report_response::Message::Settings(current)),
                    };
                    if responses.send(Ok(update)).await.is_err() {
                        break;
                    }
                }
            }
            tracing::debug!(member = %member, "Agent disconnected.");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(outgoing))))
    }
}

pub struct AdminService {
    pub groups: BTreeMap<String, GroupHandle>,
    pub activities: ActivityLog,
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
    async fn list_groups(
        &self,
        _: Request<ListGroupsRequest>,
    ) -> Result<Response<ListGroupsResponse>, Status> {
        Ok(Response::new(ListGroupsResponse {
            groups: self
                .groups
                .values()
                .map(|g| group_to_proto(&g.status()))
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
                id: m.id.clone(),
                group: status.name.clone(),
                instance_id: m.instance_id.clone(),
                address: m.address.map(|a| a.to_string()).unwrap_or_default(),
                state: m.state.as_str().to_string(),
                launched_at_ms: m.launched_at,
                cpu_busy_percent: m.latest.as_ref().and_then(|l| l.cpu_busy_percent),
                load1: m.latest.as_ref().map(|l| l.load1),
                health: m.latest.as_ref().map(|l| l.health.clone()),
                last_sample_at_ms: m.latest.as_ref().map_or(0, |l| l.at),
                lb_connections: m.lb_connections,
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
}
