//! The HTTP client for every call the collector makes out (lifecycle hooks; the cloud APIs): rustls with
//! the system's CA certificates plus any the operator names, and bounded timeouts, so a dead endpoint
//! never holds a group.

use std::path::Path;
use std::time::Duration;

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a whole request may take, answer included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A client trusting the system's CAs and, if given, the PEM certificates in `extra_ca`.
pub fn client(extra_ca: Option<&Path>) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .user_agent(concat!("ebb-collector/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT);
    if let Some(path) = extra_ca {
        let pem = crate::config::read_operator_file(path, crate::config::MAX_SMALL_FILE_BYTES)
            .map_err(|e| format!("cannot read the CA file {}: {e}", path.display()))?;
        let certificates = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
            .map_err(|e| format!("{} holds no PEM certificate: {e}", path.display()))?;
        if certificates.is_empty() {
            return Err(format!("{} holds no PEM certificate", path.display()));
        }
        for certificate in certificates {
            builder = builder.add_root_certificate(certificate);
        }
    }
    builder
        .build()
        .map_err(|e| format!("cannot set up the HTTP client: {e}"))
}

/// `value` percent-encoded for a query string or form: RFC 3986's unreserved characters stay, every other
/// byte of the UTF-8 is `%XX`.
pub fn encode(value: &str) -> String {
    percent_encode(value, |b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
}

/// `value` with every byte that `keep` refuses written `%XX` (upper-case hex).
pub fn percent_encode(value: &str, keep: impl Fn(u8) -> bool) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if keep(b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The host (and port, if given) of `url`, to name where a failed call went; never the path or query,
/// which may hold a signature.
pub fn host_of(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(url) => match (url.host_str(), url.port()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => host.to_string(),
            (None, _) => "(no host)".into(),
        },
        Err(_) => "(not a URL)".into(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn host_of_names_host_and_port_only() {
        assert_eq!(
            super::host_of("https://ec2.us-east-1.amazonaws.com/"),
            "ec2.us-east-1.amazonaws.com"
        );
        assert_eq!(
            super::host_of("http://127.0.0.1:8080/client/api?signature=secret"),
            "127.0.0.1:8080"
        );
        assert_eq!(super::host_of("nonsense"), "(not a URL)");
    }
}
