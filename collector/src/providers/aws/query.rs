//! The handful of EC2 and ELBv2 Query API actions ebb needs, called directly: form-encoded POSTs signed
//! with SigV4 by AWS's official signer (`aws-sigv4`), with credentials and region from AWS's official
//! chain (`aws-config`: environment, shared config and credentials files and profiles, web identity, the
//! instance role through IMDSv2). The full `aws-sdk-ec2` crate would cost this 2-core machine minutes of
//! every clean build for five actions (see the issue-8 note in BENCHMARKS.md).
//!
//! Throttling (`RequestLimitExceeded`, `Throttling`) is retried a few times with a growing, jittered wait;
//! every action ebb calls is idempotent (RunInstances by its ClientToken), so a retry never doubles work.

use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_credential_types::provider::ProvideCredentials;
use tokio::sync::Mutex;

use crate::providers::CloudError;

/// The API versions ebb speaks.
pub const EC2_VERSION: &str = "2016-11-15";
pub const ELBV2_VERSION: &str = "2015-12-01";

/// Attempts in all when AWS throttles.
const THROTTLED_ATTEMPTS: u32 = 4;

/// An AWS error answer.
#[derive(Debug, Clone, PartialEq)]
pub struct AwsError {
    pub action: String,
    /// AWS's error code (`InsufficientInstanceCapacity`), or `HttpNNN`/`Transport` without one.
    pub code: String,
    pub message: String,
}

impl AwsError {
    pub fn is_throttling(&self) -> bool {
        matches!(
            self.code.as_str(),
            "RequestLimitExceeded" | "Throttling" | "ThrottlingException"
        )
    }

    pub fn is_capacity(&self) -> bool {
        matches!(
            self.code.as_str(),
            "InsufficientInstanceCapacity" | "InsufficientCapacity" | "Unsupported"
        )
    }

    fn is_temporary(&self) -> bool {
        self.is_throttling()
            || self.is_capacity()
            || matches!(
                self.code.as_str(),
                "Transport" | "InternalError" | "ServiceUnavailable" | "Unavailable"
            )
            || self.code.starts_with("Http5")
    }
}

impl std::fmt::Display for AwsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hint = match self.code.as_str() {
            "RequestLimitExceeded" | "Throttling" | "ThrottlingException" => {
                "AWS is throttling this account's API calls"
            }
            "InsufficientInstanceCapacity" | "InsufficientCapacity" => {
                "AWS has no capacity for this instance type in this availability zone"
            }
            "UnauthorizedOperation" | "AccessDenied" | "AuthFailure" => {
                "the AWS credentials may not do this: check the IAM policy of the role or user ebb runs as"
            }
            "InvalidAMIID.NotFound"
            | "InvalidAMIID.Malformed"
            | "InvalidSubnetID.NotFound"
            | "InvalidGroup.NotFound"
            | "InvalidLaunchTemplateId.NotFound"
            | "InvalidLaunchTemplateName.NotFoundException"
            | "TargetGroupNotFound" => "a provider or load-balancer setting names something AWS does not have",
            _ => "AWS refused the call",
        };
        write!(f, "{hint} ({} → {}: {})", self.action, self.code, self.message)
    }
}

impl std::error::Error for AwsError {}

impl From<AwsError> for CloudError {
    fn from(error: AwsError) -> Self {
        let said = if error.is_temporary() {
            CloudError::retryable(error.to_string())
        } else {
            CloudError::permanent(error.to_string())
        };
        said.caused_by(error)
    }
}

/// One AWS service's Query endpoint.
pub struct Service {
    /// `ec2` or `elasticloadbalancing`, as signed.
    pub signing_name: &'static str,
    pub endpoint: String,
    pub version: &'static str,
}

pub struct Query {
    http: reqwest::Client,
    region: String,
    credentials: aws_credential_types::provider::SharedCredentialsProvider,
    /// Credentials until shortly before they expire.
    cached: Mutex<Option<Credentials>>,
    /// The first wait after a throttled call; it doubles.
    first_backoff: Duration,
}

impl Query {
    pub fn new(
        region: String,
        credentials: aws_credential_types::provider::SharedCredentialsProvider,
    ) -> Result<Self, CloudError> {
        Ok(Self {
            http: crate::http::client(None).map_err(CloudError::permanent)?,
            region,
            credentials,
            cached: Mutex::new(None),
            first_backoff: Duration::from_millis(500),
        })
    }

    /// For tests: throttled calls wait this long first.
    pub fn with_first_backoff(mut self, first_backoff: Duration) -> Self {
        self.first_backoff = first_backoff;
        self
    }

    async fn credentials(&self) -> Result<Credentials, AwsError> {
        let mut cached = self.cached.lock().await;
        let fresh = |c: &Credentials| {
            c.expiry()
                .is_none_or(|expiry| expiry > SystemTime::now() + Duration::from_secs(300))
        };
        if let Some(credentials) = cached.as_ref().filter(|c| fresh(c)) {
            return Ok(credentials.clone());
        }
        let credentials = self.credentials.provide_credentials().await.map_err(|e| AwsError {
            action: "credentials".into(),
            code: "NoCredentials".into(),
            message: format!(
                "no AWS credentials from the environment, ~/.aws/config and credentials, web identity or the instance role: {e}"
            ),
        })?;
        *cached = Some(credentials.clone());
        Ok(credentials)
    }

    /// Calls `action` with `params`; the answer's XML. Throttling is waited out a few times.
    pub async fn call(&self, service: &Service, action: &str, params: &[(String, String)]) -> Result<String, AwsError> {
        let mut attempt = 1;
        loop {
            match self.call_once(service, action, params).await {
                Err(e) if e.is_throttling() && attempt < THROTTLED_ATTEMPTS => {
                    let wait = self.first_backoff * 2u32.pow(attempt - 1);
                    // Full jitter: many groups throttled at once do not retry in step.
                    let jitter = wait.mul_f64(rand_unit());
                    tracing::warn!(
                        action,
                        attempt,
                        wait_ms = jitter.as_millis() as u64,
                        "AWS throttled a call; waiting."
                    );
                    tokio::time::sleep(jitter).await;
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn call_once(
        &self,
        service: &Service,
        action: &str,
        params: &[(String, String)],
    ) -> Result<String, AwsError> {
        let error = |code: &str, message: String| AwsError {
            action: action.to_string(),
            code: code.to_string(),
            message,
        };
        let mut form = vec![
            ("Action".to_string(), action.to_string()),
            ("Version".to_string(), service.version.to_string()),
        ];
        form.extend(params.iter().cloned());
        let body = form
            .iter()
            .map(|(k, v)| format!("{}={}", crate::http::encode(k), crate::http::encode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let credentials = self.credentials().await?;
        let headers = sign(
            &credentials,
            &self.region,
            service.signing_name,
            &service.endpoint,
            &body,
            SystemTime::now(),
        )
        .map_err(|e| error("Signing", e))?;
        let mut request = self
            .http
            .post(&service.endpoint)
            .header("Content-Type", "application/x-www-form-urlencoded; charset=utf-8")
            .body(body);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let response = request
            .send()
            .await
            .map_err(|e| error("Transport", transport(&service.endpoint, e)))?;
        let status = response.status().as_u16();
        let text = crate::http::text_capped(response, crate::http::MAX_ANSWER_BYTES)
            .await
            .map_err(|e| match e {
                crate::http::BodyError::Transport(e) => error("Transport", transport(&service.endpoint, e)),
                too_large => error(&format!("Http{status}"), too_large.to_string()),
            })?;
        if (200..300).contains(&status) {
            return Ok(text);
        }
        let (code, message) =
            error_in(&text).unwrap_or_else(|| (format!("Http{status}"), text.chars().take(200).collect()));
        Err(error(&code, message))
    }
}

/// A failed exchange with `endpoint`, naming its host.
fn transport(endpoint: &str, error: reqwest::Error) -> String {
    format!(
        "cannot reach {}: {}",
        crate::http::host_of(endpoint),
        error.without_url()
    )
}

/// A number in [0.5, 1): the jitter factor, from the system's randomness.
fn rand_unit() -> f64 {
    let mut byte = [0u8; 1];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut byte);
    0.5 + f64::from(byte[0]) / 512.0
}

/// The SigV4 headers (`authorization`, `x-amz-date`, and `x-amz-security-token` for temporary credentials)
/// for a form POST of `body` to `endpoint`.
pub fn sign(
    credentials: &Credentials,
    region: &str,
    service: &str,
    endpoint: &str,
    body: &str,
    time: SystemTime,
) -> Result<Vec<(String, String)>, String> {
    use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
    let identity = aws_smithy_runtime_api::client::identity::Identity::from(credentials.clone());
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(time)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| e.to_string())?
        .into();
    let content_type = [("content-type", "application/x-www-form-urlencoded; charset=utf-8")];
    let signable = SignableRequest::new(
        "POST",
        endpoint,
        content_type.into_iter(),
        SignableBody::Bytes(body.as_bytes()),
    )
    .map_err(|e| e.to_string())?;
    let (instructions, _) = sign(signable, &params).map_err(|e| e.to_string())?.into_parts();
    Ok(instructions
        .headers()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect())
}

/// The `Code` and `Message` of an EC2 (`Response/Errors/Error`) or ELBv2 (`ErrorResponse/Error`) answer.
pub(crate) fn error_in(xml: &str) -> Option<(String, String)> {
    let document = roxmltree::Document::parse(xml).ok()?;
    let error = document.descendants().find(|n| n.has_tag_name("Error"))?;
    let child = |name: &str| {
        error
            .children()
            .find(|n| n.tag_name().name() == name)
            .and_then(|n| n.text())
            .unwrap_or_default()
            .to_string()
    };
    Some((child("Code"), child("Message")))
}

/// The text of the first child element named `name` of `node`.
pub fn child_text<'a>(node: roxmltree::Node<'a, 'a>, name: &str) -> Option<&'a str> {
    node.children()
        .find(|n| n.tag_name().name() == name)
        .and_then(|n| n.text())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AWS's published SigV4 test suite vector `post-x-www-form-urlencoded`: the example credentials,
    /// 2015-08-30T12:36:00Z, us-east-1, service `service`, body `Param1=value1`.
    #[test]
    fn the_signer_matches_the_published_vector() {
        let credentials = Credentials::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            None,
            None,
            "test",
        );
        let time = SystemTime::UNIX_EPOCH + Duration::from_secs(1_440_938_160);
        let headers = sign_with_content_type(&credentials, time);
        let authorization = headers.iter().find(|(n, _)| n == "authorization").unwrap();
        assert!(
            authorization
                .1
                .ends_with("Signature=ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a"),
            "{authorization:?}"
        );
        assert!(
            headers
                .iter()
                .any(|(n, v)| n == "x-amz-date" && v == "20150830T123600Z")
        );
    }

    /// The vector signs `content-type: application/x-www-form-urlencoded` (no charset).
    fn sign_with_content_type(credentials: &Credentials, time: SystemTime) -> Vec<(String, String)> {
        use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
        let identity = aws_smithy_runtime_api::client::identity::Identity::from(credentials.clone());
        let params = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&identity)
            .region("us-east-1")
            .name("service")
            .time(time)
            .settings(SigningSettings::default())
            .build()
            .unwrap()
            .into();
        let signable = SignableRequest::new(
            "POST",
            "https://example.amazonaws.com/",
            [("content-type", "application/x-www-form-urlencoded")].into_iter(),
            SignableBody::Bytes(b"Param1=value1"),
        )
        .unwrap();
        let (instructions, _) = sign(signable, &params).unwrap().into_parts();
        instructions
            .headers()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn error_answers_of_both_services_are_read() {
        let ec2 = "<Response><Errors><Error><Code>InsufficientInstanceCapacity</Code><Message>no c5.large</Message></Error></Errors><RequestID>r</RequestID></Response>";
        assert_eq!(
            error_in(ec2),
            Some(("InsufficientInstanceCapacity".into(), "no c5.large".into()))
        );
        let elb = "<ErrorResponse xmlns=\"http://elasticloadbalancing.amazonaws.com/doc/2015-12-01/\"><Error><Type>Sender</Type><Code>Throttling</Code><Message>Rate exceeded</Message></Error></ErrorResponse>";
        assert_eq!(error_in(elb), Some(("Throttling".into(), "Rate exceeded".into())));
        let throttled = AwsError {
            action: "RunInstances".into(),
            code: "RequestLimitExceeded".into(),
            message: "m".into(),
        };
        assert!(CloudError::from(throttled).is_retryable());
        let denied = AwsError {
            action: "RunInstances".into(),
            code: "UnauthorizedOperation".into(),
            message: "m".into(),
        };
        let denied = CloudError::from(denied);
        assert!(
            !denied.is_retryable() && denied.to_string().contains("IAM policy"),
            "{denied}"
        );
    }
}
