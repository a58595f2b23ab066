//! The agent's identity: enrolment with a one-time join token, the key that never leaves the VM, the
//! certificate the collector issues, and its renewal.
//!
//! Trust: the agent knows the collector only by the SHA-256 fingerprint of its CA (from user data). Before
//! it sends its token it fetches the collector's certificate chain, finds the CA with that fingerprint (or
//! refuses), and from then on verifies the collector against that CA like any TLS client.

use std::future::Future;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ebb_proto::v1::enrollment_client::EnrollmentClient;
use ebb_proto::v1::{EnrollRequest, InstanceFacts, RenewRequest};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::transport::{self, ConnectError, authority_of};

/// The longest an enrolment call may take once connected.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Error)]
pub enum IdentityError {
    /// The collector did not show the CA the user data pins. The token was not sent.
    #[error(
        "the collector at {url} presented no CA certificate with SHA-256 {expected}; refusing to send the join token (wrong collector, wrong fingerprint, or someone in between)"
    )]
    WrongCa { url: String, expected: String },
    /// No identity yet and nothing to enrol with.
    #[error(
        "this agent is not enrolled: set [enrollment] token and ca_sha256 (from the VM's user data, or `ebb-collector user-data`), or [enrollment] user_data_source to fetch them"
    )]
    NotEnrolled,
    /// The collector refused; the message says why.
    #[error("the collector refused ({:?}): {}", .0.code(), .0.message())]
    Refused(tonic::Status),
    /// The network or TLS failed.
    #[error("cannot reach the collector at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    /// A local file could not be read or written.
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

impl IdentityError {
    /// Worth trying again as is (the collector may come back); the others need an operator.
    pub fn is_retryable(&self) -> bool {
        match self {
            IdentityError::Unreachable { .. } => true,
            IdentityError::Refused(status) => transport::is_retryable(status),
            _ => false,
        }
    }
}

/// What the agent keeps in its state directory (`identity.toml`, `cert.pem`, `key.pem`, `ca.pem`, all 0600).
/// Its `Debug` leaves the key out.
#[derive(Clone, PartialEq)]
pub struct Identity {
    /// The collector it enrolled with, which it reports to from then on.
    pub collector_url: String,
    pub member_id: String,
    pub group: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
    pub issued_at_ms: i64,
    pub not_after_ms: i64,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("member_id", &self.member_id)
            .field("group", &self.group)
            .field("not_after_ms", &self.not_after_ms)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityFile {
    collector_url: String,
    member_id: String,
    group: String,
    issued_at_ms: i64,
    not_after_ms: i64,
}

impl Identity {
    /// The identity saved in `dir`, if any.
    pub fn load(dir: &Path) -> Result<Option<Self>, IdentityError> {
        let path = dir.join("identity.toml");
        if !path.exists() {
            return Ok(None);
        }
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| IdentityError::File { path, source })
        };
        let file: IdentityFile = toml::from_str(&read("identity.toml")?)
            .map_err(|e| IdentityError::Invalid(format!("{}: {e}", path.display())))?;
        Ok(Some(Self {
            collector_url: file.collector_url,
            member_id: file.member_id,
            group: file.group,
            cert_pem: read("cert.pem")?,
            key_pem: read("key.pem")?,
            ca_pem: read("ca.pem")?,
            issued_at_ms: file.issued_at_ms,
            not_after_ms: file.not_after_ms,
        }))
    }

    /// Writes every file owner-only; `identity.toml` last, so a crash never leaves a half identity.
    pub fn save(&self, dir: &Path) -> Result<(), IdentityError> {
        let file_error = |path: &Path| {
            let path = path.to_path_buf();
            move |source| IdentityError::File { path, source }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(file_error(dir))?;
        let file = IdentityFile {
            collector_url: self.collector_url.clone(),
            member_id: self.member_id.clone(),
            group: self.group.clone(),
            issued_at_ms: self.issued_at_ms,
            not_after_ms: self.not_after_ms,
        };
        let summary = toml::to_string(&file).map_err(|e| IdentityError::Invalid(e.to_string()))?;
        for (name, contents) in [
            ("key.pem", &self.key_pem),
            ("cert.pem", &self.cert_pem),
            ("ca.pem", &self.ca_pem),
            ("identity.toml", &summary),
        ] {
            write_private(&dir.join(name), contents).map_err(file_error(&dir.join(name)))?;
        }
        Ok(())
    }

    /// TLS for talking to the collector as this member.
    pub fn client_tls(&self) -> Result<rustls::ClientConfig, IdentityError> {
        let chain = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| IdentityError::Invalid(format!("cert.pem: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| IdentityError::Invalid(format!("key.pem: {e}")))?;
        trusting(&self.ca_pem)?
            .with_client_auth_cert(chain, key)
            .map_err(|e| IdentityError::Invalid(format!("cert.pem and key.pem: {e}")))
    }

    /// When to renew: about two thirds into the certificate's life.
    pub fn renew_at_ms(&self) -> i64 {
        self.issued_at_ms + (self.not_after_ms - self.issued_at_ms) * 2 / 3
    }
}

/// Replaces the file atomically: a temporary owner-only file renamed over it.
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)
}

/// Accepts any server certificate: used only to learn the chain, before anything is sent.
#[derive(Debug)]
struct LearnChain(rustls::crypto::WebPkiSupportedAlgorithms);

impl ServerCertVerifier for LearnChain {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// A TLS client that trusts only the CA `ca_pem`, ready for a client certificate or none.
fn trusting(
    ca_pem: &str,
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>, IdentityError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| IdentityError::Invalid(format!("ca.pem: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| IdentityError::Invalid(format!("ca.pem: {e}")))?;
    }
    Ok(
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| IdentityError::Invalid(e.to_string()))?
            .with_root_certificates(roots),
    )
}

fn connect_error(url: &str) -> impl Fn(ConnectError) -> IdentityError + '_ {
    move |e| match e {
        ConnectError::Invalid(reason) => IdentityError::Invalid(reason),
        ConnectError::Unreachable(reason) => IdentityError::Unreachable {
            url: url.to_string(),
            reason,
        },
    }
}

/// An Enrollment client on a new connection to the collector at `url`.
async fn enrollment(
    url: &str,
    tls: rustls::ClientConfig,
) -> Result<EnrollmentClient<transport::Channel>, IdentityError> {
    let channel = transport::connect(url, tls).await.map_err(connect_error(url))?;
    let origin = channel.origin();
    Ok(EnrollmentClient::with_origin(channel, origin).max_decoding_message_size(transport::limits::MAX_MESSAGE_BYTES))
}

/// The answer to one unary call, within [`CALL_TIMEOUT`].
async fn answer<T>(
    url: &str,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, IdentityError> {
    let unreachable = |reason: String| IdentityError::Unreachable {
        url: url.to_string(),
        reason,
    };
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Err(_) => Err(unreachable(format!("no answer within {} s", CALL_TIMEOUT.as_secs()))),
        Ok(Err(status)) if transport::is_transport_failure(&status) => Err(unreachable(status.message().to_string())),
        Ok(Err(status)) => Err(IdentityError::Refused(status)),
        Ok(Ok(response)) => Ok(response.into_inner()),
    }
}

/// The PEM of the certificate in the collector's chain whose SHA-256 is `expected_sha256`.
pub async fn pin_ca(url: &str, expected_sha256: &str) -> Result<String, IdentityError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| IdentityError::Invalid(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(LearnChain(provider.signature_verification_algorithms)))
        .with_no_client_auth();
    let tls = transport::tls_connect(url, config, None)
        .await
        .map_err(connect_error(url))?;
    let chain = tls.get_ref().1.peer_certificates().unwrap_or_default();
    let expected = expected_sha256.to_ascii_lowercase().replace(':', "");
    chain
        .iter()
        .find(|cert| sha256_hex(cert) == expected)
        .map(|cert| to_pem(cert))
        .ok_or_else(|| IdentityError::WrongCa {
            url: url.to_string(),
            expected: expected_sha256.to_string(),
        })
}

/// A new key (kept) and a request for it (sent).
fn key_and_csr() -> Result<(KeyPair, Vec<u8>), IdentityError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| IdentityError::Invalid(e.to_string()))?;
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .map_err(|e| IdentityError::Invalid(e.to_string()))?;
    Ok((key, csr.der().to_vec()))
}

/// Enrols with `token`, trusting only the CA pinned by `ca_sha256`.
pub async fn enroll(
    url: &str,
    ca_sha256: &str,
    token: &str,
    group: &str,
    now_ms: i64,
) -> Result<Identity, IdentityError> {
    enroll_as(url, ca_sha256, token, group, "", now_ms).await
}

/// [`enroll`], telling the collector the cloud's instance id.
pub async fn enroll_as(
    url: &str,
    ca_sha256: &str,
    token: &str,
    group: &str,
    instance_id: &str,
    now_ms: i64,
) -> Result<Identity, IdentityError> {
    let ca_pem = pin_ca(url, ca_sha256).await?;
    let (key, csr_der) = key_and_csr()?;
    let request = EnrollRequest {
        token: token.to_string(),
        csr_der,
        facts: Some(InstanceFacts {
            instance_id: instance_id.to_string(),
            ..instance_facts(url)
        }),
        group: group.to_string(),
    };
    let mut client = enrollment(url, trusting(&ca_pem)?.with_no_client_auth()).await?;
    let response = answer(url, client.enroll(request)).await?;
    Ok(Identity {
        collector_url: url.to_string(),
        member_id: response.member_id,
        group: response.group,
        cert_pem: response.certificate_pem,
        key_pem: key.serialize_pem(),
        ca_pem,
        issued_at_ms: now_ms,
        not_after_ms: response.not_after_ms,
    })
}

/// A new certificate for a new key, from the collector it enrolled with, over mTLS with the current one.
pub async fn renew(current: &Identity, now_ms: i64) -> Result<Identity, IdentityError> {
    let (key, csr_der) = key_and_csr()?;
    let url = &current.collector_url;
    let mut client = enrollment(url, current.client_tls()?).await?;
    let response = answer(url, client.renew(RenewRequest { csr_der })).await?;
    Ok(Identity {
        cert_pem: response.certificate_pem,
        key_pem: key.serialize_pem(),
        issued_at_ms: now_ms,
        not_after_ms: response.not_after_ms,
        ..current.clone()
    })
}

/// Hostname and the address this VM uses to reach the collector.
fn instance_facts(url: &str) -> InstanceFacts {
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let address = authority_of(url).ok().and_then(|(authority, _)| {
        use std::net::ToSocketAddrs;
        let target = authority.to_socket_addrs().ok()?.next()?;
        let socket = std::net::UdpSocket::bind(if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).ok()?;
        socket.connect(target).ok()?;
        Some(socket.local_addr().ok()?.ip().to_string())
    });
    InstanceFacts {
        hostname,
        addresses: address.into_iter().collect(),
        instance_id: String::new(),
    }
}

/// Removes the `token = ...` line from the agent's configuration file once enrolled.
pub fn forget_token(config_path: &Path) -> Result<(), IdentityError> {
    let file_error = |source| IdentityError::File {
        path: config_path.to_path_buf(),
        source,
    };
    let text = std::fs::read_to_string(config_path).map_err(file_error)?;
    let kept: String = text
        .lines()
        .filter(|line| !line.trim_start().starts_with("token") || !line.contains('='))
        .map(|line| format!("{line}\n"))
        .collect();
    if kept != text {
        write_private(config_path, &kept).map_err(file_error)?;
    }
    Ok(())
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// DER to PEM.
fn to_pem(der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut encoded = String::new();
    for chunk in der.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                encoded.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                encoded.push('=');
            }
        }
    }
    let lines: Vec<&str> = encoded
        .as_bytes()
        .chunks(64)
        .map(|l| std::str::from_utf8(l).unwrap())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        lines.join("\n")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_encoding_round_trips() {
        for der in [
            vec![],
            vec![1u8],
            vec![1, 2],
            vec![1, 2, 3],
            (0..=255).collect::<Vec<u8>>(),
        ] {
            let pem = to_pem(&der);
            let decoded: Vec<u8> = if der.is_empty() {
                vec![]
            } else {
                <CertificateDer as rustls::pki_types::pem::PemObject>::from_pem_slice(pem.as_bytes())
                    .unwrap()
                    .to_vec()
            };
            assert_eq!(decoded, der, "{pem}");
        }
    }

    #[test]
    fn identity_is_saved_owner_only_and_loaded_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Identity::load(dir.path()).unwrap(), None);
        let identity = Identity {
            collector_url: "https://c:7300".into(),
            member_id: "web-3".into(),
            group: "web".into(),
            cert_pem: "CERT".into(),
            key_pem: "KEY".into(),
            ca_pem: "CA".into(),
            issued_at_ms: 1_000,
            not_after_ms: 4_000,
        };
        identity.save(&dir.path().join("state")).unwrap();
        for name in ["key.pem", "cert.pem", "ca.pem", "identity.toml"] {
            let mode = std::fs::metadata(dir.path().join("state").join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
        assert_eq!(
            Identity::load(&dir.path().join("state")).unwrap(),
            Some(identity.clone())
        );
        assert_eq!(identity.renew_at_ms(), 3_000);
        assert!(!format!("{identity:?}").contains("KEY"), "Debug never shows the key");
    }

    #[test]
    fn the_token_line_is_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            "collector_url = \"https://c:7300\"\n[enrollment]\nca_sha256 = \"ab\"\ntoken = \"ebbjt_1\"\n",
        )
        .unwrap();
        forget_token(&path).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "collector_url = \"https://c:7300\"\n[enrollment]\nca_sha256 = \"ab\"\n"
        );
    }
}
