//! The collector's certificate authority: its own CA (ECDSA P-256, created on first start in the state
//! directory, owner-only files) or the operator's; the server certificate; member and admin certificates
//! whose every field the collector sets; verification of client certificates; join tokens (`tokens`).
//!
//! Nothing here logs a key or a token.

pub mod rate;
pub mod tokens;

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, UnixTime};
use thiserror::Error;
use time::OffsetDateTime;

use crate::engine::Millis;

/// URI SANs name what a certificate is for: `ebb://member/<group>/<member>` or `ebb://admin/<name>`.
const URI_PREFIX: &str = "ebb://";

#[derive(Debug, Error)]
pub enum PkiError {
    /// A file of the CA could not be read or written.
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A certificate, key or request could not be parsed or produced.
    #[error("{0}")]
    Certificate(String),
}

fn cert_error(context: &str) -> impl Fn(rcgen::Error) -> PkiError + '_ {
    move |e| PkiError::Certificate(format!("{context}: {e}"))
}

/// Who a verified client certificate belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientIdentity {
    Member {
        group: String,
        member_id: String,
        serial: String,
    },
    Admin {
        name: String,
        serial: String,
    },
}

/// Why a client certificate was refused; `reason` labels the metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertRejection {
    pub reason: &'static str,
    pub message: String,
}

pub struct Pki {
    ca_der: CertificateDer<'static>,
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
    server_chain_pem: String,
    server_key_pem: String,
    member_lifetime: Duration,
}

impl Pki {
    /// Loads `ca.pem` and `ca.key` from `dir`, creating them (owner-only) on first start; issues a fresh
    /// server certificate for `server_names` (DNS names or IP addresses).
    pub fn load_or_create(dir: &Path, server_names: &[String], member_lifetime: Duration) -> Result<Self, PkiError> {
        let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
        if !cert_path.exists() {
            std::fs::create_dir_all(dir).map_err(|source| PkiError::File {
                path: dir.to_path_buf(),
                source,
            })?;
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(cert_error("generating the CA key"))?;
            let mut params = CertificateParams::default();
            params.distinguished_name = DistinguishedName::new();
            params.distinguished_name.push(DnType::CommonName, "ebb collector CA");
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let now = OffsetDateTime::now_utc();
            params.not_before = now - time::Duration::minutes(5);
            params.not_after = now + time::Duration::days(3650);
            let cert = params.self_signed(&key).map_err(cert_error("signing the CA"))?;
            write_private(&key_path, &key.serialize_pem())?;
            write_private(&cert_path, &cert.pem())?;
            tracing::info!(path = %cert_path.display(), "Created the collector's CA.");
        }
        Self::from_files(&cert_path, &key_path, server_names, member_lifetime)
    }

    /// Uses a CA the operator gives (PEM certificate and PKCS#8 key).
    pub fn from_files(
        ca_cert: &Path,
        ca_key: &Path,
        server_names: &[String],
        member_lifetime: Duration,
    ) -> Result<Self, PkiError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| PkiError::File {
                path: path.to_path_buf(),
                source,
            })
        };
        let ca_pem = read(ca_cert)?;
        let key = KeyPair::from_pem(&read(ca_key)?).map_err(cert_error("the CA key"))?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, key).map_err(cert_error("the CA certificate"))?;
        let ca_der = rustls::pki_types::pem::PemObject::from_pem_slice(ca_pem.as_bytes())
            .map_err(|e| PkiError::Certificate(format!("the CA certificate: {e}")))?;

        let server_key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(cert_error("generating the server key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, "ebb collector");
        params.subject_alt_names = server_names
            .iter()
            .map(|name| match name.parse() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => name.clone().try_into().map(SanType::DnsName),
            })
            .collect::<Result<_, _>>()
            .map_err(cert_error("server.tls_names"))?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::days(365);
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let server = params
            .signed_by(&server_key, &issuer)
            .map_err(cert_error("signing the server certificate"))?;
        Ok(Self {
            ca_der,
            server_chain_pem: format!("{}{}", server.pem(), ca_pem),
            ca_pem,
            issuer,
            server_key_pem: server_key.serialize_pem(),
            member_lifetime,
        })
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    /// The server certificate followed by the CA, so that agents can pin the CA from the handshake.
    pub fn server_chain_pem(&self) -> &str {
        &self.server_chain_pem
    }

    pub fn server_key_pem(&self) -> &str {
        &self.server_key_pem
    }

    /// SHA-256 of the CA certificate (DER), lowercase hex: what agents pin.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.ca_der)
    }

    /// A member certificate for the public key in `csr_der`. Only the key is taken from the request; every
    /// field is set here: subject = member id, URI SAN naming group and member, client-auth only, not a CA.
    pub fn issue_member(
        &self,
        csr_der: &[u8],
        group: &str,
        member_id: &str,
        now: Millis,
    ) -> Result<IssuedCert, PkiError> {
        let csr = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
            .map_err(cert_error("the certificate request"))?;
        self.issue(
            &csr.public_key,
            member_id,
            &format!("{URI_PREFIX}member/{group}/{member_id}"),
            now,
            self.member_lifetime,
        )
    }

    /// An admin certificate and its key, for the operator's CLI.
    pub fn issue_admin(&self, name: &str, now: Millis, lifetime: Duration) -> Result<(IssuedCert, String), PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(cert_error("generating the admin key"))?;
        let cert = self.issue(
            &key,
            &format!("admin {name}"),
            &format!("{URI_PREFIX}admin/{name}"),
            now,
            lifetime,
        )?;
        Ok((cert, key.serialize_pem()))
    }

    fn issue(
        &self,
        public_key: &impl rcgen::PublicKeyData,
        common_name: &str,
        uri: &str,
        now: Millis,
        lifetime: Duration,
    ) -> Result<IssuedCert, PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.subject_alt_names = vec![SanType::URI(
            uri.to_string().try_into().map_err(cert_error("the URI SAN"))?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let now = OffsetDateTime::from_unix_timestamp_nanos(i128::from(now) * 1_000_000)
            .map_err(|e| PkiError::Certificate(format!("the time: {e}")))?;
        // A little slack for agents whose clock is behind.
        params.not_before = now - time::Duration::minutes(5);
        let not_after = now + time::Duration::try_from(lifetime).unwrap_or(time::Duration::days(1));
        params.not_after = not_after;
        let serial = random_serial();
        params.serial_number = Some(serial.clone());
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(cert_error("signing"))?;
        Ok(IssuedCert {
            pem: cert.pem(),
            serial: hex(&serial.to_bytes()),
            not_after_ms: (not_after.unix_timestamp_nanos() / 1_000_000) as Millis,
        })
    }

    /// Verifies a client's chain against this CA at `now` and says whose it is.
    pub fn verify_client(&self, chain: &[CertificateDer<'_>], now: Millis) -> Result<ClientIdentity, CertRejection> {
        let reject = |reason, message: String| CertRejection { reason, message };
        let Some(leaf) = chain.first() else {
            return Err(reject(
                "no_client_certificate",
                "a client certificate from this collector's CA is required; enrol with a join token first".into(),
            ));
        };
        let anchor =
            webpki::anchor_from_trusted_cert(&self.ca_der).map_err(|e| reject("bad_ca", format!("the CA: {e}")))?;
        let end_entity = webpki::EndEntityCert::try_from(leaf)
            .map_err(|e| reject("malformed_certificate", format!("malformed client certificate: {e}")))?;
        let time = UnixTime::since_unix_epoch(Duration::from_millis(now.max(0) as u64));
        end_entity
            .verify_for_usage(
                &[
                    webpki::ring::ECDSA_P256_SHA256,
                    webpki::ring::ECDSA_P384_SHA384,
                    webpki::ring::ED25519,
                ],
                &[anchor],
                &chain[1..],
                time,
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )
            .map_err(|e| match e {
                webpki::Error::CertExpired { .. } => reject(
                    "expired_certificate",
                    "the client certificate has expired; the agent must enrol again".into(),
                ),
                webpki::Error::CertNotValidYet { .. } => reject(
                    "certificate_not_yet_valid",
                    "the client certificate is not valid yet; check the clocks".into(),
                ),
                webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => reject(
                    "unknown_issuer",
                    "the client certificate was not issued by this collector's CA".into(),
                ),
                other => reject(
                    "invalid_certificate",
                    format!("the client certificate is not acceptable: {other}"),
                ),
            })?;
        identity_of(leaf).ok_or_else(|| {
            reject(
                "no_identity",
                "the client certificate names no ebb member or admin".into(),
            )
        })
    }
}

/// A certificate the collector issued.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub pem: String,
    /// Lowercase hex.
    pub serial: String,
    pub not_after_ms: Millis,
}

/// The identity in a certificate's `ebb://` URI SAN, with its serial.
pub fn identity_of(cert: &CertificateDer<'_>) -> Option<ClientIdentity> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let serial = hex(parsed.raw_serial());
    let sans = parsed.subject_alternative_name().ok()??;
    sans.value.general_names.iter().find_map(|name| {
        let x509_parser::extensions::GeneralName::URI(uri) = name else {
            return None;
        };
        let path = uri.strip_prefix(URI_PREFIX)?;
        match path.split('/').collect::<Vec<_>>().as_slice() {
            ["member", group, member_id] => Some(ClientIdentity::Member {
                group: group.to_string(),
                member_id: member_id.to_string(),
                serial: serial.clone(),
            }),
            ["admin", name] => Some(ClientIdentity::Admin {
                name: name.to_string(),
                serial: serial.clone(),
            }),
            _ => None,
        }
    })
}

pub fn fingerprint(der: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, der).as_ref())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// 16 random bytes, positive (high bit clear) and with a non-zero first byte, so that DER encodes all 16
/// bytes as they are: a leading zero would be dropped, and the serial read back from the certificate would
/// no longer match the one recorded at issue.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).expect("the system's random source");
    bytes[0] = (bytes[0] & 0x7f).max(1);
    SerialNumber::from_slice(&bytes)
}

/// Writes a new file readable by its owner only.
pub fn write_private(path: &Path, contents: &str) -> Result<(), PkiError> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(contents.as_bytes()))
        .map_err(|source| PkiError::File {
            path: path.to_path_buf(),
            source,
        })
}

/// How many enrolment attempts are allowed per minute, from one address and in all.
#[derive(Debug, Clone, Copy)]
pub struct EnrollmentLimits {
    pub per_address_per_minute: u32,
    pub total_per_minute: u32,
}

impl Default for EnrollmentLimits {
    fn default() -> Self {
        Self {
            per_address_per_minute: 600,
            total_per_minute: 12_000,
        }
    }
}

/// Remote addresses the enrolment limit keeps count of within a minute; past that, new ones are refused
/// until the minute ends (a flood from many addresses cannot grow the table).
const MAX_ADDRESSES_TRACKED: usize = 50_000;
/// Renewals allowed per member per hour, and members tracked within an hour.
pub const RENEWALS_PER_HOUR: u32 = 10;
const MAX_MEMBERS_TRACKED: usize = 100_000;

/// The collector's trust state: its PKI, the join tokens, which certificate of each member is current,
/// and the enrolment rate limit. Shared by the gRPC services and the group controllers.
pub struct Authority {
    pub pki: Pki,
    pub tokens: tokens::TokenStore,
    /// How long the token minted for each launch is good for.
    pub launch_token_ttl_secs: u32,
    /// Enrolment attempts, per remote address and in all, per minute.
    pub enrollments: rate::RateLimiter<std::net::IpAddr>,
    /// Renewals per member per hour: an agent renews a few times a day.
    pub renewals: rate::RateLimiter<String>,
    /// Serials each member may use: the current one and, while it renews, the one before. Written
    /// through to the store, so enrolled agents keep working across a restart.
    serials: std::sync::Mutex<std::collections::HashMap<String, Vec<String>>>,
    store: std::sync::Arc<crate::store::Store>,
}

impl Authority {
    /// The authority over `pki`, with the tokens and serials `store` holds.
    pub fn new(
        pki: Pki,
        launch_token_ttl_secs: u32,
        limits: EnrollmentLimits,
        store: std::sync::Arc<crate::store::Store>,
    ) -> Result<Self, crate::store::StoreError> {
        Ok(Self {
            pki,
            tokens: tokens::TokenStore::load(store.clone())?,
            launch_token_ttl_secs,
            enrollments: rate::RateLimiter::new(
                60_000,
                limits.per_address_per_minute,
                limits.total_per_minute,
                MAX_ADDRESSES_TRACKED,
            ),
            renewals: rate::RateLimiter::new(3_600_000, RENEWALS_PER_HOUR, u32::MAX, MAX_MEMBERS_TRACKED),
            serials: std::sync::Mutex::new(store.serials()?.into_iter().collect()),
            store,
        })
    }

    fn persist_serials(&self, member_id: &str, serials: &[String]) {
        if let Err(e) = self.store.save_serials(member_id, serials) {
            tracing::error!(error = %e, member = %member_id, "Cannot save a member's certificate serials.");
        }
    }

    /// Records a certificate issued to `member_id`; it and the one before are valid, older ones are not.
    pub fn record_issued(&self, member_id: &str, serial: &str) {
        let mut serials = self.serials.lock().unwrap();
        let valid = serials.entry(member_id.to_string()).or_default();
        valid.push(serial.to_string());
        if valid.len() > 2 {
            valid.remove(0);
        }
        self.persist_serials(member_id, valid);
    }

    /// Whether `serial` is a current certificate of `member_id`.
    pub fn is_current(&self, member_id: &str, serial: &str) -> bool {
        self.serials
            .lock()
            .unwrap()
            .get(member_id)
            .is_some_and(|valid| valid.iter().any(|s| s == serial))
    }

    /// Denies every certificate of `member_id` from now on; false if it had none.
    pub fn revoke_member(&self, member_id: &str) -> bool {
        self.tokens.revoke_bound(member_id);
        let had = self.serials.lock().unwrap().remove(member_id).is_some();
        if had {
            self.persist_serials(member_id, &[]);
        }
        had
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    pub(crate) const NOW: Millis = 1_800_000_000_000;

    pub(crate) fn pki(dir: &Path) -> Pki {
        Pki::load_or_create(
            dir,
            &["localhost".into(), "127.0.0.1".into()],
            Duration::from_secs(24 * 3600),
        )
        .unwrap()
    }

    /// A CSR that asks for everything it should not get.
    pub(crate) fn greedy_csr() -> (KeyPair, Vec<u8>) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(vec!["collector.example".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, "web-99");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let csr = params.serialize_request(&key).unwrap();
        (key, csr.der().to_vec())
    }

    fn der(pem: &str) -> CertificateDer<'static> {
        rustls::pki_types::pem::PemObject::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[test]
    fn the_ca_is_created_once_owner_only_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = pki(dir.path());
        let mode = std::fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let second = pki(dir.path());
        assert_eq!(first.fingerprint(), second.fingerprint(), "the same CA after a restart");
        assert_eq!(first.fingerprint().len(), 64);
    }

    #[test]
    fn the_collector_sets_every_field_whatever_the_csr_asks() {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki(dir.path());
        let (_, csr) = greedy_csr();
        let issued = pki.issue_member(&csr, "web", "web-3", NOW).unwrap();
        let der = der(&issued.pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(
            cert.subject().iter_common_name().next().unwrap().as_str().unwrap(),
            "web-3"
        );
        let constraints = cert.basic_constraints().unwrap().map(|c| c.value.ca);
        assert_ne!(constraints, Some(true), "never a CA");
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth, "client-auth only");
        let lifetime = cert.validity().not_after.timestamp() - NOW / 1000;
        assert_eq!(lifetime, 24 * 3600);
        assert_eq!(
            identity_of(&der),
            Some(ClientIdentity::Member {
                group: "web".into(),
                member_id: "web-3".into(),
                serial: issued.serial.clone()
            })
        );
        assert!(pki.verify_client(&[der], NOW).is_ok());
    }

    #[test]
    fn foreign_expired_and_missing_certificates_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ours = pki(dir.path());
        let other_dir = tempfile::tempdir().unwrap();
        let theirs = pki(other_dir.path());
        let (_, csr) = greedy_csr();
        let foreign = der(&theirs.issue_member(&csr, "web", "web-1", NOW).unwrap().pem);
        assert_eq!(
            ours.verify_client(&[foreign], NOW).unwrap_err().reason,
            "unknown_issuer"
        );

        let mine = der(&ours.issue_member(&csr, "web", "web-1", NOW).unwrap().pem);
        let a_day_and_a_minute_later = NOW + (24 * 3600 + 60) * 1000;
        assert_eq!(
            ours.verify_client(&[mine], a_day_and_a_minute_later)
                .unwrap_err()
                .reason,
            "expired_certificate"
        );
        assert_eq!(
            ours.verify_client(&[], NOW).unwrap_err().reason,
            "no_client_certificate"
        );
    }

    /// The serial recorded at issue is the one a verifier reads from the certificate, every time.
    #[test]
    fn issued_serials_read_back_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki(dir.path());
        let (_, csr) = greedy_csr();
        for _ in 0..1000 {
            let issued = pki.issue_member(&csr, "web", "web-1", NOW).unwrap();
            let Some(ClientIdentity::Member { serial, .. }) = identity_of(&der(&issued.pem)) else {
                panic!()
            };
            assert_eq!(serial, issued.serial);
        }
    }

    #[test]
    fn admin_certificates_name_the_admin() {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki(dir.path());
        let (cert, key) = pki.issue_admin("ops", NOW, Duration::from_secs(3600)).unwrap();
        assert!(key.contains("PRIVATE KEY"));
        let identity = pki.verify_client(&[der(&cert.pem)], NOW).unwrap();
        assert!(
            matches!(identity, ClientIdentity::Admin { ref name, .. } if name == "ops"),
            "{identity:?}"
        );
    }
}
