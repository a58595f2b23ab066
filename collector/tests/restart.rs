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
