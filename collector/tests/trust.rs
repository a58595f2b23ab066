//! Who may enrol, report and administer: every refusal is a clear gRPC status, counted, and stores nothing.

mod common;

use common::{Harness, report};
use ebb_agent::identity::{self, IdentityError};
use ebb_proto::v1::admin_client::AdminClient;
use ebb_proto::v1::enrollment_client::EnrollmentClient;
use ebb_proto::v1::{
    EnrollRequest, ListGroupsRequest, ReportRequest, ReportResponse, RevokeMemberRequest, report_response,
};

use tonic::Code;

fn csr() -> Vec<u8> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec()
}

#[tokio::test]
async fn enrolment_issues_a_certificate_whose_fields_the_collector_sets() {
    let h = Harness::start("").await;
    let channel = h.channel(h.collector.grpc_address, None).await;
    // A request asking for a CA, server auth and another name.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["collector.example".to_string()]).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let greedy = params.serialize_request(&key).unwrap().der().to_vec();
    let response = EnrollmentClient::new(channel)
        .enroll(EnrollRequest {
            token: h.token("web", 600, 1),
            csr_der: greedy,
            facts: None,
            group: "web".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let der: rustls::pki_types::CertificateDer =
        rustls::pki_types::pem::PemObject::from_pem_slice(response.certificate_pem.as_bytes()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    assert_ne!(cert.basic_constraints().unwrap().map(|c| c.value.ca), Some(true));
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth);
    assert_eq!(
        cert.subject().iter_common_name().next().unwrap().as_str().unwrap(),
        response.member_id
    );
    assert_eq!(h.metric("ebb_enrollments_total "), 1);
    h.collector.shutdown().await;
}

#[tokio::test]
async fn tokens_are_single_use_unexpired_and_for_their_group() {
    let h = Harness::start("").await;
    let (url, pin) = (h.url(), h.fingerprint());
    let now = ebb_agent::now_ms();
    let token = h.token("web", 600, 1);
    identity::enroll(&url, &pin, &token, "web", now).await.unwrap();
    let refused = |e: IdentityError| match e {
        IdentityError::Refused(status) => status,
        other => panic!("{other}"),
    };
    let twice = refused(identity::enroll(&url, &pin, &token, "web", now).await.unwrap_err());
    assert_eq!(twice.code(), Code::PermissionDenied);
    assert!(twice.message().contains("already been used"), "{}", twice.message());

    let expired = h.token("web", 0, 1);
    let status = refused(identity::enroll(&url, &pin, &expired, "web", now).await.unwrap_err());
    assert!(status.message().contains("expired"), "{}", status.message());

    let for_db = h.token("db", 600, 1);
    let status = refused(identity::enroll(&url, &pin, &for_db, "web", now).await.unwrap_err());
    assert!(
        status.message().contains("for group `db`, not `web`"),
        "{}",
        status.message()
    );

    assert_eq!(
        h.metric("ebb_requests_refused_total{service=\"enroll\",reason=\"used_token\"}"),
        1
    );
    assert_eq!(
        h.metric("ebb_requests_refused_total{service=\"enroll\",reason=\"expired_token\"}"),
        1
    );
    assert_eq!(
        h.metric("ebb_requests_refused_total{service=\"enroll\",reason=\"wrong_group\"}"),
        1
    );
    assert_eq!(h.metric("ebb_enrollments_total "), 1);
    h.collector.shutdown().await;
}

#[tokio::test]
async fn a_wrong_ca_fingerprint_means_the_token_is_never_sent() {
    let h = Harness::start("").await;
    let token = h.token("web", 600, 1);
    let wrong = "00".repeat(32);
    let error = identity::enroll(&h.url(), &wrong, &token, "web", ebb_agent::now_ms())
        .await
        .unwrap_err();
    assert!(matches!(error, IdentityError::WrongCa { .. }), "{error}");
    assert!(error.to_string().contains("refusing to send the join token"));
    // The token is still unused: it never reached the collector.
    identity::enroll(&h.url(), &h.fingerprint(), &token, "web", ebb_agent::now_ms())
        .await
        .unwrap();
    h.collector.shutdown().await;
}

#[tokio::test]
async fn reports_need_a_current_certificate_from_this_ca_for_the_member_itself() {
    let h = Harness::start("").await;
    let address = h.collector.grpc_address;
    let alice = h.enroll().await;
    let bob = h.enroll().await;

    // No client certificate.
    let status = report(h.channel(address, None).await, &alice.member_id)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        status.message().contains("enrol with a join token first"),
        "{}",
        status.message()
    );

    // A certificate from another CA.
    let other = Harness::start("").await;
    let stranger = other.enroll().await;
    let channel = h.channel(address, Some((&stranger.cert_pem, &stranger.key_pem))).await;
    let status = report(channel, &stranger.member_id).await.unwrap_err();
    assert!(
        status.message().contains("not issued by this collector's CA"),
        "{}",
        status.message()
    );

    // An expired certificate of this CA.
    let long_ago = ebb_agent::now_ms() - 2 * 24 * 3600 * 1000;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    let old = h
        .collector
        .authority
        .pki
        .issue_member(&csr, "web", &alice.member_id, long_ago)
        .unwrap();
    let channel = h.channel(address, Some((&old.pem, &key.serialize_pem()))).await;
    let status = report(channel, &alice.member_id).await.unwrap_err();
    assert!(status.message().contains("expired"), "{}", status.message());

    // Bob's certificate, reporting as Alice.
    let channel = h.channel(address, Some((&bob.cert_pem, &bob.key_pem))).await;
    let status = report(channel, &alice.member_id).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status
            .message()
            .contains(&format!("cannot report as {}", alice.member_id)),
        "{}",
        status.message()
    );

    for reason in [
        "no_client_certificate",
        "unknown_issuer",
        "expired_certificate",
        "impersonation",
    ] {
        let line = format!("ebb_requests_refused_total{{service=\"report\",reason=\"{reason}\"}}");
        assert_eq!(h.metric(&line), 1, "{reason}");
    }
    assert_eq!(h.metric("ebb_samples_ingested_total "), 0, "nothing stored");

    // Alice herself is accepted.
    let channel = h.channel(address, Some((&alice.cert_pem, &alice.key_pem))).await;
    let (mut responses, _requests) = report(channel, &alice.member_id).await.unwrap();
    let mut acked = false;
    while let Some(message) = responses.message().await.unwrap() {
        if let Some(report_response::Message::Ack(ack)) = message.message
            && ack.highest_seq == 1
        {
            acked = true;
            break;
        }
    }
    assert!(acked);
    other.collector.shutdown().await;
    h.collector.shutdown().await;
}

/// A newly enrolled member's Report stream, past its first response; its channel; what ends the stream.
async fn open_stream(
    h: &Harness,
) -> (
    identity::Identity,
    tonic::transport::Channel,
    tonic::Streaming<ReportResponse>,
    tokio::sync::mpsc::Sender<ReportRequest>,
) {
    let member = h.enroll().await;
    let channel = h
        .channel(h.collector.grpc_address, Some((&member.cert_pem, &member.key_pem)))
        .await;
    let (mut responses, requests) = report(channel.clone(), &member.member_id).await.unwrap();
    responses.message().await.unwrap().expect("settings");
    (member, channel, responses, requests)
}

/// The status a stream ends with, within 10 s.
async fn end_of(responses: &mut tonic::Streaming<ReportResponse>) -> tonic::Status {
    let ended = async {
        loop {
            match responses.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("ended without a status"),
                Err(status) => break status,
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), ended)
        .await
        .expect("the stream ends within 10 s")
}

#[tokio::test]
async fn revoking_a_member_closes_its_stream_and_denies_its_certificate() {
    let h = Harness::start("").await;
    let (member, channel, mut responses, _requests) = open_stream(&h).await;

    let (admin_cert, admin_key) = h.admin_identity();
    let admin = h
        .channel(h.collector.admin_address.unwrap(), Some((&admin_cert, &admin_key)))
        .await;
    AdminClient::new(admin)
        .revoke_member(RevokeMemberRequest {
            member_id: member.member_id.clone(),
        })
        .await
        .unwrap();
    let closed = end_of(&mut responses).await;
    assert_eq!(closed.code(), Code::PermissionDenied);
    assert!(closed.message().contains("revoked"), "{}", closed.message());
    let status = report(channel, &member.member_id).await.unwrap_err();
    assert!(status.message().contains("has been revoked"), "{}", status.message());
    assert_eq!(
        h.metric("ebb_requests_refused_total{service=\"report\",reason=\"revoked_certificate\"}"),
        1
    );
    h.collector.shutdown().await;
}

#[tokio::test]
async fn renewal_gives_a_new_certificate_and_retires_the_one_before_the_last() {
    let h = Harness::start("").await;
    let first = h.enroll().await;
    let second = identity::renew(&first, ebb_agent::now_ms()).await.unwrap();
    assert_ne!(second.cert_pem, first.cert_pem);
    assert_ne!(second.key_pem, first.key_pem, "a new key each time");
    let third = identity::renew(&second, ebb_agent::now_ms()).await.unwrap();
    let address = h.collector.grpc_address;
    for (identity, accepted) in [(&first, false), (&second, true), (&third, true)] {
        let channel = h.channel(address, Some((&identity.cert_pem, &identity.key_pem))).await;
        assert_eq!(report(channel, &identity.member_id).await.is_ok(), accepted);
    }
    h.collector.shutdown().await;
}

#[tokio::test]
async fn a_token_use_is_spent_only_by_an_enrolment_that_succeeds() {
    let h = Harness::start("").await;
    let token = h.token("web", 600, 1);
    // A bad CSR: the enrolment fails, the token keeps its use.
    let status = EnrollmentClient::new(h.channel(h.collector.grpc_address, None).await)
        .enroll(EnrollRequest {
            token: token.clone(),
            csr_der: b"not a CSR".to_vec(),
            group: "web".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(h.collector.authority.tokens.list(ebb_agent::now_ms())[0].uses_left, 1);
    identity::enroll(&h.url(), &h.fingerprint(), &token, "web", ebb_agent::now_ms())
        .await
        .expect("the use was not burnt");
    assert_eq!(h.collector.authority.tokens.list(ebb_agent::now_ms())[0].uses_left, 0);
    h.collector.shutdown().await;
}

#[tokio::test]
async fn renewals_are_rate_limited_per_member() {
    let h = Harness::start("").await;
    let mut current = h.enroll().await;
    for _ in 0..ebb_collector::pki::RENEWALS_PER_HOUR {
        current = identity::renew(&current, ebb_agent::now_ms()).await.unwrap();
    }
    match identity::renew(&current, ebb_agent::now_ms()).await {
        Err(IdentityError::Refused(status)) => {
            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
            assert!(status.message().contains("retry later"), "{}", status.message());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        h.metric("ebb_requests_refused_total{service=\"renew\",reason=\"rate_limited\"}"),
        1
    );
    // Another member is not held back by it.
    let other = h.enroll().await;
    identity::renew(&other, ebb_agent::now_ms()).await.unwrap();
    h.collector.shutdown().await;
}

#[tokio::test]
async fn the_admin_api_needs_an_admin_certificate() {
    let h = Harness::start("").await;
    let address = h.collector.admin_address.unwrap();
    let status = AdminClient::new(h.channel(address, None).await)
        .list_groups(ListGroupsRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let member = h.enroll().await;
    let status = AdminClient::new(h.channel(address, Some((&member.cert_pem, &member.key_pem))).await)
        .list_groups(ListGroupsRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let (cert, key) = h.admin_identity();
    let groups = AdminClient::new(h.channel(address, Some((&cert, &key))).await)
        .list_groups(ListGroupsRequest {})
        .await
        .unwrap()
        .into_inner()
        .groups;
    assert_eq!(groups.len(), 2);
    // Health and reflection are not answered to strangers there either.
    let status = tonic_health::pb::health_client::HealthClient::new(h.channel(address, None).await)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    h.collector.shutdown().await;
}

/// Sends one batch on a Report stream and returns the next answer, or the status that ended the stream.
async fn send_batch(
    requests: &tokio::sync::mpsc::Sender<ReportRequest>,
    responses: &mut tonic::Streaming<ReportResponse>,
    samples: Vec<ebb_proto::v1::Sample>,
) -> Result<ReportResponse, tonic::Status> {
    requests
        .send(ReportRequest {
            message: Some(ebb_proto::v1::report_request::Message::Batch(
                ebb_proto::v1::SampleBatch { samples },
            )),
        })
        .await
        .map_err(|_| tonic::Status::cancelled("the stream is gone"))?;
    tokio::time::timeout(std::time::Duration::from_secs(10), responses.message())
        .await
        .expect("an answer within 10 s")?
        .ok_or_else(|| tonic::Status::cancelled("ended without a status"))
}

/// Reads answers until an ack covers `seq`.
async fn acked_upto(responses: &mut tonic::Streaming<ReportResponse>, seq: u64) {
    loop {
        let answer = responses.message().await.unwrap().expect("an answer");
        if let Some(report_response::Message::Ack(ack)) = answer.message
            && ack.highest_seq >= seq
        {
            return;
        }
    }
}

fn sample(seq: u64) -> ebb_proto::v1::Sample {
    ebb_proto::v1::Sample {
        seq,
        timestamp_ms: ebb_agent::now_ms(),
        cpu_busy_percent: Some(10.0),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_second_agent_run_takes_the_stream_over_and_the_first_is_told_why_without_losing_samples() {
    let h = Harness::start("").await;
    let (member, channel, mut first, first_requests) = open_stream(&h).await;
    let ingested = || h.metric("ebb_samples_ingested_total ");
    // The harness's stream is run 1; its sample 1 is stored and acknowledged.
    acked_upto(&mut first, 1).await;
    let stored = ingested();

    // Run 2 of the same member says Hello: run 1's stream ends ABORTED, saying why.
    let (requests, outgoing) = tokio::sync::mpsc::channel(4);
    requests
        .send(ReportRequest {
            message: Some(ebb_proto::v1::report_request::Message::Hello(ebb_proto::v1::Hello {
                member_id: member.member_id.clone(),
                run_id: 2,
                ..Default::default()
            })),
        })
        .await
        .unwrap();
    let mut second = ebb_proto::v1::telemetry_client::TelemetryClient::new(channel.clone())
        .report(tokio_stream::wrappers::ReceiverStream::new(outgoing))
        .await
        .unwrap()
        .into_inner();
    let ended = end_of(&mut first).await;
    assert_eq!(ended.code(), Code::Aborted, "{ended:?}");
    assert!(ended.message().contains("took over"), "{}", ended.message());
    // Whatever run 1 still sends is neither stored nor acknowledged.
    let late = send_batch(&first_requests, &mut first, vec![sample(2)]).await;
    assert!(late.is_err(), "{late:?}");
    assert_eq!(ingested(), stored);

    // Run 2 numbers from 1 and is stored.
    second.message().await.unwrap().expect("settings");
    second.message().await.unwrap().expect("the first ack");
    let answer = send_batch(&requests, &mut second, vec![sample(1), sample(2)])
        .await
        .unwrap();
    assert!(matches!(answer.message, Some(report_response::Message::Ack(ack)) if ack.highest_seq == 2));
    assert_eq!(ingested(), stored + 2);
    h.collector.shutdown().await;
}

#[tokio::test]
async fn batches_are_bounded_and_acks_never_outgrow_their_request() {
    let h = Harness::start("").await;
    let (_member, _channel, mut responses, requests) = open_stream(&h).await;
    acked_upto(&mut responses, 1).await;
    // 400 samples, every one rejected (no sequence number): the ack lists what fits in the request's size.
    let rejected: Vec<_> = (0..400).map(|_| ebb_proto::v1::Sample::default()).collect();
    let request_bytes = prost::Message::encoded_len(&ReportRequest {
        message: Some(ebb_proto::v1::report_request::Message::Batch(
            ebb_proto::v1::SampleBatch {
                samples: rejected.clone(),
            },
        )),
    });
    let answer = send_batch(&requests, &mut responses, rejected).await.unwrap();
    assert!(
        prost::Message::encoded_len(&answer) <= request_bytes,
        "an ack of {} bytes for a request of {request_bytes}",
        prost::Message::encoded_len(&answer)
    );
    assert_eq!(
        h.metric("ebb_samples_rejected_total{reason=\"no_sequence\"}"),
        400,
        "every rejection is counted, listed or not"
    );
    // 501 samples: refused whole, with a status that says the limit.
    let too_many = (2..503).map(sample).collect();
    let ended = send_batch(&requests, &mut responses, too_many).await.unwrap_err();
    assert_eq!(ended.code(), Code::InvalidArgument, "{ended:?}");
    assert!(ended.message().contains("at most 500 samples"), "{}", ended.message());
    h.collector.shutdown().await;
}

#[tokio::test]
async fn oversized_messages_and_enrolment_floods_are_refused() {
    let h = Harness::start("enrollments_per_minute = 3").await;
    let channel = h.channel(h.collector.grpc_address, None).await;
    let mut client = EnrollmentClient::new(channel);
    let huge = EnrollRequest {
        token: "x".repeat(1024 * 1024),
        csr_der: csr(),
        facts: None,
        group: String::new(),
    };
    let status = client.enroll(huge).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );
    assert_eq!(
        h.metric("ebb_requests_refused_total{service=\"grpc\",reason=\"oversized_message\"}"),
        1
    );

    let attempt = || EnrollRequest {
        token: "ebbjt_guess".into(),
        csr_der: csr(),
        facts: None,
        group: String::new(),
    };
    for _ in 0..3 {
        assert_eq!(
            client.enroll(attempt()).await.unwrap_err().code(),
            Code::PermissionDenied
        );
    }
    let status = client.enroll(attempt()).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("retry later"), "{}", status.message());
    assert_eq!(
        h.metric("ebb_requests_refused_total{service=\"enroll\",reason=\"rate_limited\"}"),
        1
    );
    assert_eq!(
        h.metric("ebb_requests_refused_total{service=\"enroll\",reason=\"unknown_token\"}"),
        3
    );
    h.collector.shutdown().await;
}

#[tokio::test]
async fn enrolment_attempts_from_all_addresses_together_are_limited() {
    let h = Harness::start("enrollments_per_minute_total = 4").await;
    // Four addresses of 127.0.0.0/8, one attempt each, then a fifth: refused whatever its address.
    for n in 1..=5u8 {
        let from = std::net::IpAddr::from([127, 0, 3, n]);
        let channel = ebb_agent::transport::connect_from(&h.url(), h.client_tls(None), Some(from))
            .await
            .unwrap();
        let origin = channel.origin();
        let status = EnrollmentClient::with_origin(channel, origin)
            .enroll(EnrollRequest {
                token: "ebbjt_guess".into(),
                csr_der: csr(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        let expected = if n <= 4 {
            Code::PermissionDenied
        } else {
            Code::ResourceExhausted
        };
        assert_eq!(status.code(), expected, "attempt {n}: {status:?}");
    }
    assert_eq!(
        h.metric("ebb_requests_refused_total{service=\"enroll\",reason=\"rate_limited_total\"}"),
        1
    );
    h.collector.shutdown().await;
}

/// A fake OpenStack metadata service serving `user_data` and an instance uuid.
async fn openstack_metadata(user_data: String) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut buf = vec![0u8; 4096];
            let n = socket.read(&mut buf).await.unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..n]).to_string();
            let body = if request.starts_with("GET /openstack/latest/user_data ") {
                user_data.clone()
            } else {
                r#"{"uuid": "8d1f2a3b-os"}"#.to_string()
            };
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
        }
    });
    format!("http://{address}")
}

#[tokio::test]
async fn an_agent_enrols_from_user_data_in_the_metadata_service_and_never_writes_the_token() {
    let h = Harness::start("").await;
    let token = h.token("web", 600, 1);
    let agent_toml = ebb_collector::userdata::agent_config(&h.url(), &h.fingerprint(), &token, "web");
    let user_data = ebb_collector::userdata::render(ebb_collector::userdata::UserDataFormat::CloudConfig, &agent_toml);
    let metadata_url = openstack_metadata(user_data).await;

    let state = tempfile::tempdir().unwrap();
    let config: ebb_agent::config::AgentConfig = ebb_agent::config::parse_toml(
        std::path::Path::new("agent.toml"),
        &format!(
            "state_dir = \"{}\"\n[enrollment]\nuser_data_source = \"openstack\"\nmetadata_url = \"{metadata_url}\"\n",
            state.path().display()
        ),
    )
    .unwrap();
    let identity = ebb_agent::obtain_identity(&config).await.unwrap();
    assert_eq!(identity.group, "web");
    assert_eq!(identity.collector_url, h.url());
    let member = h
        .collector
        .groups
        .get("web")
        .unwrap()
        .status()
        .members
        .into_iter()
        .find(|m| m.member.id == identity.member_id)
        .unwrap();
    assert_eq!(
        member.member.instance_id, "8d1f2a3b-os",
        "the instance id from the metadata service reaches the collector"
    );
    for entry in std::fs::read_dir(state.path()).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap_or_default();
        assert!(!text.contains(&token), "the token was written to disk");
    }
    // A restart finds the saved identity and needs neither the metadata service nor a token.
    let again = ebb_agent::obtain_identity(&config).await.unwrap();
    assert_eq!(again.member_id, identity.member_id);
    h.collector.shutdown().await;
}

#[tokio::test]
async fn an_agents_stream_ends_unavailable_when_the_collector_stops() {
    let h = Harness::start("").await;
    let (_member, _channel, mut responses, _requests) = open_stream(&h).await;
    h.collector.shutdown().await;
    let ended = end_of(&mut responses).await;
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
}

#[tokio::test]
async fn an_oversized_report_message_ends_the_stream_and_is_counted() {
    let h = Harness::start("").await;
    let (_member, _channel, mut responses, requests) = open_stream(&h).await;
    let ingested_before = h.metric("ebb_samples_ingested_total ");
    // About 330 KB: more than the 256 KiB a message may carry.
    let samples = (2..3000)
        .map(|seq| ebb_proto::v1::Sample {
            seq,
            timestamp_ms: ebb_agent::now_ms(),
            custom: [("padding".to_string(), 1.0)].into(),
            health: Some(ebb_proto::v1::HealthCheck {
                reason: "x".repeat(80),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect();
    requests
        .send(ReportRequest {
            message: Some(ebb_proto::v1::report_request::Message::Batch(
                ebb_proto::v1::SampleBatch { samples },
            )),
        })
        .await
        .unwrap();
    let ended = end_of(&mut responses).await;
    assert_eq!(ended.code(), Code::OutOfRange, "{ended:?}");
    assert!(
        ended.message().contains("message length too large"),
        "{}",
        ended.message()
    );
    assert_eq!(
        h.metric("ebb_requests_refused_total{service=\"report\",reason=\"oversized_message\"}"),
        1
    );
    assert_eq!(
        h.metric("ebb_samples_ingested_total "),
        ingested_before,
        "nothing stored"
    );
    h.collector.shutdown().await;
}

/// Another local user must read nothing of the collector's state: token hashes, members, keys, activities.
#[tokio::test]
async fn the_state_directory_is_owner_only_whatever_the_umask_and_whoever_made_it() {
    use std::os::unix::fs::PermissionsExt;
    // The usual umask, under which files are created readable by all unless made otherwise.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // Left open by hand, or by an older version.
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(state.join("notes.txt"), "x").unwrap();
    std::fs::set_permissions(state.join("notes.txt"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let collector = ebb_collector::Collector::start(common::config(&state, ""))
        .await
        .unwrap();
    let mode = |name: &str| std::fs::metadata(state.join(name)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(""), 0o700);
    for file in [
        "notes.txt",
        "collector.db",
        "collector.db-wal",
        "ca.key",
        "admin.key",
        "admin.sock",
    ] {
        assert_eq!(mode(file), 0o600, "{file}");
    }
    assert!(
        std::fs::read_dir(&state).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".admin-socket-")),
        "the admin socket's private staging directory is gone"
    );
    collector.shutdown().await;
}
