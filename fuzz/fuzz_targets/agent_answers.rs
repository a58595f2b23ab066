#![no_main]

use std::time::Duration;

use ebb_agent::health::HealthTarget;
use ebb_proto::v1::{EnrollResponse, RenewResponse, ReportResponse, report_response};
use prost::Message;

// What the agent decodes from the collector (its answers, and the health-check URL its settings carry) and
// from a metadata service (user data, where it looks for its configuration).
libfuzzer_sys::fuzz_target!(|bytes: &[u8]| {
    let _ = EnrollResponse::decode(bytes);
    let _ = RenewResponse::decode(bytes);
    if let Ok(ReportResponse {
        message: Some(report_response::Message::Settings(settings)),
    }) = ReportResponse::decode(bytes)
    {
        let _ = HealthTarget::parse(&settings.health_check_url, Duration::from_secs(2), (200, 399));
    }
    if let Ok(text) = std::str::from_utf8(bytes) {
        let _ = HealthTarget::parse(text, Duration::from_secs(2), (200, 399));
        let _ = ebb_agent::metadata::agent_config_in(text);
    }
});
