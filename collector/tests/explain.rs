//! `Admin.Explain` and `Admin.SetSuspended` over the real Admin API: an operator can read why a group held,
//! see a suspension take effect, and is told clearly about a group that does not exist.

mod common;

use std::time::Duration;

use common::Harness;
use ebb_proto::v1::admin_client::AdminClient;
use ebb_proto::v1::{ExplainRequest, SetSuspendedRequest};
use tonic::Code;
use tonic::transport::Channel;

async fn explain(admin: &mut AdminClient<Channel>, since_ms: i64) -> Vec<ebb_proto::v1::Explanation> {
    admin
        .explain(ExplainRequest {
            group: "web".into(),
            since_ms,
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .explanations
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explanations_say_why_and_follow_a_suspension() {
    let h = Harness::start("").await;
    let (cert, key) = h.admin_identity();
    let mut admin = AdminClient::new(h.channel(h.collector.admin_address.unwrap(), Some((&cert, &key))).await);

    // The test groups have no policy: every evaluation holds, and says so, as one record.
    let mut records = Vec::new();
    for _ in 0..50 {
        records = explain(&mut admin, 0).await;
        if records.first().is_some_and(|r| r.evaluations >= 2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(records.len(), 1, "{records:?}");
    let record = &records[0];
    assert_eq!(
        (record.action.as_str(), record.reason.as_str()),
        ("none", "no_policies")
    );
    assert!(
        record.evaluations >= 2 && record.until_ms > record.from_ms,
        "{record:?}"
    );
    assert!(
        record.text.contains("the group has no scaling policy"),
        "{}",
        record.text
    );
    let json: serde_json::Value = serde_json::from_str(&record.json).unwrap();
    assert_eq!(json["reason"]["code"], "no_policies");

    admin
        .set_suspended(SetSuspendedRequest {
            group: "web".into(),
            suspended: true,
            processes: vec!["decide".into()],
        })
        .await
        .unwrap();
    let since = record.until_ms + 1;
    let mut suspended = false;
    for _ in 0..50 {
        suspended = explain(&mut admin, since).await.iter().any(|r| r.reason == "suspended");
        if suspended {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(suspended, "no suspended evaluation within 10 s");

    let status = admin
        .explain(ExplainRequest {
            group: "nope".into(),
            since_ms: 0,
            limit: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(
        status.message().contains("no group named `nope`"),
        "{}",
        status.message()
    );
    h.collector.shutdown().await;
}
