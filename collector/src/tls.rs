//! The collector's TLS listener. The handshake asks every client for a certificate but lets it connect
//! without one (an agent that is enrolling has none yet); the certificate, if any, is verified by the gRPC
//! handlers against the CA ([`crate::pki::Pki::verify_client`]), so that each refusal is a clear gRPC status
//! that is counted, not an opaque handshake failure.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::DistinguishedName;

use crate::StartError;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes doing their work at once, at most, per listener. In a storm of connections (a fleet reconnecting
/// after the collector restarts, a boot storm) thousands of handshakes in flight would grow the heap by their
/// state, and it stays fragmented after they finish: 2026-12-02's `bench ingest` left twice the memory per
/// agent without this bound. A handshake is about a millisecond of CPU, so this many keep every core busy.
const HANDSHAKES_AT_ONCE: usize = 64;
/// How long a handshake may hold its turn, from its ClientHello to its end: a client answers within this on any
/// network, and one that stalls gives its turn up. Waiting for the ClientHello takes no turn, so connections
/// that send nothing never hold one.
const HANDSHAKE_TURN_TIMEOUT: Duration = Duration::from_secs(3);

/// What a handler knows about the other end; tonic puts it in each request's extensions.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// `None` on the Unix socket.
    pub remote: Option<SocketAddr>,
    /// The client's certificate chain, leaf first; empty without one. Not yet verified.
    pub certs: Arc<Vec<CertificateDer<'static>>>,
}

/// Asks for a client certificate, accepts any (or none), and checks that the client holds its key.
#[derive(Debug)]
struct CertificateOptional {
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for CertificateOptional {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A certificate, key or TLS setting that cannot make the server's configuration.
fn tls(error: impl std::error::Error + Send + Sync + 'static) -> StartError {
    StartError::Tls(Box::new(error))
}

/// The rustls configuration for `chain_pem` (leaf first) and `key_pem`, speaking HTTP/2.
pub fn server_config(chain_pem: &str, key_pem: &str) -> Result<Arc<rustls::ServerConfig>, StartError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(tls)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(tls)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(tls)?
        .with_client_cert_verifier(Arc::new(CertificateOptional {
            algorithms: provider.signature_verification_algorithms,
        }))
        .with_single_cert(chain, key)
        .map_err(tls)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The server's side of one TLS handshake: the ClientHello, then the rest in one of the listener's `turns`.
async fn handshake<Io: AsyncRead + AsyncWrite + Unpin>(
    io: Io,
    config: Arc<rustls::ServerConfig>,
    turns: &Semaphore,
) -> io::Result<TlsStream<Io>> {
    let hello = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io).await?;
    let _turn = turns.acquire().await.expect("the semaphore is never closed");
    tokio::time::timeout(HANDSHAKE_TURN_TIMEOUT, hello.into_stream(config))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the client stalled during the handshake"))?
}

/// A listener the TLS layer accepts from: TCP, or a Unix socket (which has no remote address).
pub trait Accept: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(&self) -> impl std::future::Future<Output = io::Result<(Self::Io, Option<SocketAddr>)>> + Send;
}

impl Accept for TcpListener {
    type Io = TcpStream;
    async fn accept(&self) -> io::Result<(TcpStream, Option<SocketAddr>)> {
        let (tcp, remote) = TcpListener::accept(self).await?;
        let _ = tcp.set_nodelay(true);
        Ok((tcp, Some(remote)))
    }
}

impl Accept for UnixListener {
    type Io = UnixStream;
    async fn accept(&self) -> io::Result<(UnixStream, Option<SocketAddr>)> {
        let (stream, _) = UnixListener::accept(self).await?;
        Ok((stream, None))
    }
}

/// The TLS handshakes of one listener: each under [`HANDSHAKE_TIMEOUT`], at most [`HANDSHAKES_AT_ONCE`] past
/// their ClientHello.
#[derive(Clone)]
pub struct Handshakes {
    turns: Arc<Semaphore>,
}

impl Default for Handshakes {
    fn default() -> Self {
        Self {
            turns: Arc::new(Semaphore::new(HANDSHAKES_AT_ONCE)),
        }
    }
}

impl Handshakes {
    /// The TLS stream and what the handlers may know of the client, or `None` when the handshake failed.
    pub async fn complete<Io: AsyncRead + AsyncWrite + Unpin>(
        &self,
        io: Io,
        remote: Option<SocketAddr>,
        config: Arc<rustls::ServerConfig>,
    ) -> Option<(TlsStream<Io>, PeerInfo)> {
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(io, config, &self.turns)).await {
            Ok(Ok(stream)) => {
                let certs = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                    .unwrap_or_default();
                let info = PeerInfo {
                    remote,
                    certs: Arc::new(certs),
                };
                Some((stream, info))
            }
            Ok(Err(e)) => {
                tracing::debug!(?remote, error = %e, "TLS handshake failed.");
                None
            }
            Err(_) => {
                tracing::debug!(?remote, "TLS handshake timed out.");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::mpsc;

    /// A listener on loopback with a self-signed certificate; its address, the clients whose handshake
    /// completed, and a client config trusting it.
    async fn listener() -> (
        SocketAddr,
        mpsc::UnboundedReceiver<(TlsStream<TcpStream>, PeerInfo)>,
        Arc<rustls::ClientConfig>,
    ) {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let config = server_config(&cert.cert.pem(), &cert.signing_key.serialize_pem()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.cert.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let (completed, ready) = mpsc::unbounded_channel();
        let handshakes = Handshakes::default();
        tokio::spawn(async move {
            loop {
                let (io, remote) = Accept::accept(&listener).await.unwrap();
                let (handshakes, config, completed) = (handshakes.clone(), config.clone(), completed.clone());
                tokio::spawn(async move {
                    if let Some(done) = handshakes.complete(io, remote, config).await {
                        let _ = completed.send(done);
                    }
                });
            }
        });
        (address, ready, Arc::new(client))
    }

    /// Whether a client's handshake completes within `wait`.
    async fn handshake_completes(address: SocketAddr, client: &Arc<rustls::ClientConfig>, wait: Duration) -> bool {
        let connect = async {
            let tcp = TcpStream::connect(address).await?;
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            tokio_rustls::TlsConnector::from(client.clone())
                .connect(name, tcp)
                .await
        };
        matches!(tokio::time::timeout(wait, connect).await, Ok(Ok(_)))
    }

    #[tokio::test]
    async fn connections_that_send_nothing_take_no_turn_and_stalled_handshakes_give_theirs_up() {
        let (address, mut ready, client) = listener().await;
        let mut idle = Vec::new();
        for _ in 0..2 * HANDSHAKES_AT_ONCE {
            idle.push(TcpStream::connect(address).await.unwrap());
        }
        assert!(
            handshake_completes(address, &client, Duration::from_secs(5)).await,
            "idle connections must not hold turns"
        );
        assert!(ready.recv().await.is_some());

        // Clients that send their ClientHello and then stall hold every turn, until the turn times out.
        let mut stalled = Vec::new();
        for _ in 0..HANDSHAKES_AT_ONCE {
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let mut hello = Vec::new();
            rustls::ClientConnection::new(client.clone(), name)
                .unwrap()
                .write_tls(&mut hello)
                .unwrap();
            let mut tcp = TcpStream::connect(address).await.unwrap();
            tcp.write_all(&hello).await.unwrap();
            // The server answers a ClientHello only once the handshake has its turn.
            let mut answer = [0u8; 1];
            tcp.read_exact(&mut answer).await.unwrap();
            stalled.push(tcp);
        }
        assert!(
            !handshake_completes(address, &client, Duration::from_secs(1)).await,
            "every turn is taken"
        );
        assert!(
            handshake_completes(address, &client, HANDSHAKE_TURN_TIMEOUT + Duration::from_secs(5)).await,
            "the stalled handshakes give their turns up after {HANDSHAKE_TURN_TIMEOUT:?}"
        );
        drop((idle, stalled));
    }
}
