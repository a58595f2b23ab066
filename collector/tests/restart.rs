//! Nothing an operator relies on is lost across a collector restart: enrolled agents carry on with the
//! certificate they have (no re-enrolment), operators' tokens and revocations hold, and the activity
//! history is still there.

mod common;

use common::{Harness, report};
use ebb_proto::v1::report_response;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_tokens_revocations_and_history_survive_a_restart() {
    let h = Harness::start("").await;
    let alice = h.enroll().await;
    let bob = h.enroll().await;
    let now = ebb_agent::now_ms();
    let (_, token) = h.collector.authority.tokens.create("web", now, 3600, 2, true, None);
    h.collector.authority.revoke_member(&bob.member_id);
    let joins_before = h.collector.activities.newest("web", 100).len();
    assert!(joins_before >= 2, "two joins recorded");

    let h = h.restart().await;
    let address = h.collector.grpc_address;
    let channel = h.channel(address, Some((&alice.cert_pem, &alice.key_pem))).await;
    let (mut responses, _requests) = report(channel, &alice.member_id)
        .await
        .expect("the same certificate works after the restart");
    let first = responses.message().await.unwrap().unwrap();
    assert!(
        matches!(
            first.message,
            Some(report_response::Message::Ack(_)) | Some(report_response::Message::Settings(_))
        ),
        "{first:?}"
    );
    let channel = h.channel(address, Some((&bob.cert_pem, &bob.key_pem))).await;
    assert!(report(channel, &bob.member_id).await.is_err(), "still revoked");

    let tokens = h.collector.authority.tokens.list(ebb_agent::now_ms());
    assert!(
        tokens
            .iter()
            .any(|t| t.id == token.id && t.protected && t.uses_left == 2),
        "{tokens:?}"
    );
    assert!(h.collector.activities.newest("web", 100).len() >= joins_before);
    h.collector.shutdown().await;
}

/// A collector that cannot start says why, as a typed error: a second one on the same state directory
/// finds the first's admin socket alive; a port taken by another program is named with its setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_cannot_start_says_what_is_in_the_way() {
    let h = common::Harness::start("").await;
    let second = ebb_collector::Collector::start(common::config(h.state.path(), "")).await;
    let Err(ebb_collector::StartError::InUse(path)) = second else {
        panic!("a second collector on one state directory started: {:?}", second.err());
    };
    assert_eq!(path, h.state.path().join("admin.sock"));

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other_state = tempfile::tempdir().unwrap();
    let mut config = common::config(other_state.path(), "");
    config.server.grpc_listen = taken.local_addr().unwrap();
    let error = ebb_collector::Collector::start(config)
        .await
        .err()
        .expect("the port is taken");
    let ebb_collector::StartError::Io { what, source } = &error else {
        panic!("{error:?}");
    };
    assert_eq!(
        what,
        &format!("cannot listen on server.grpc_listen {}", taken.local_addr().unwrap())
    );
    assert_eq!(source.kind(), std::io::ErrorKind::AddrInUse);
    h.collector.shutdown().await;
}
