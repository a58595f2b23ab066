//! The collector's TLS listener. The handshake asks every client for a certificate but lets it connect
//! without one (an agent that is enrolling has none yet); the certificate, if any, is verified by the gRPC
//! handlers against the CA ([`crate::pki::Pki::verify_client`]), so that each refusal is a clear gRPC status
//! that is counted, not an opaque handshake failure.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::DistinguishedName;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::server::Connected;

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

/// One accepted TLS connection.
pub struct TlsConnection<Io> {
    pub(crate) stream: TlsStream<Io>,
    pub(crate) info: PeerInfo,
    /// Bytes already read from `stream` by whoever looked at the connection first, to be read again.
    pub(crate) replay: Vec<u8>,
}

impl<Io> Connected for TlsConnection<Io> {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl<Io: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsConnection<Io> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.replay.is_empty() {
            let n = self.replay.len().min(buf.remaining());
            buf.put_slice(&self.replay[..n]);
            self.replay.drain(..n);
            if self.replay.is_empty() {
                self.replay = Vec::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<Io: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsConnection<Io> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
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

/// The rustls configuration for `chain_pem` (leaf first) and `key_pem`, speaking HTTP/2.
pub fn server_config(chain_pem: &str, key_pem: &str) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(CertificateOptional {
            algorithms: provider.signature_verification_algorithms,
        }))
        .with_single_cert(chain, key)?;
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

/// Takes some connections before tonic sees them and serves them itself, in a task of their own; gives back
/// the others.
pub type Divert<Io> =
    Arc<dyn Fn(TlsConnection<Io>) -> Pin<Box<dyn Future<Output = Option<TlsConnection<Io>>> + Send>> + Send + Sync>;

/// Accepts connections on `listener` and completes their TLS handshakes concurrently (each under a
/// timeout, at most [`HANDSHAKES_AT_ONCE`] past their ClientHello); yields the connections ready for gRPC,
/// except those `divert` keeps.
pub fn incoming<L: Accept>(
    listener: L,
    config: Arc<rustls::ServerConfig>,
    divert: Option<Divert<L::Io>>,
) -> UnboundedReceiverStream<io::Result<TlsConnection<L::Io>>> {
    // Unbounded: each connection waiting here has already cost its handshake; tonic takes them at once.
    let (ready, stream) = mpsc::unbounded_channel();
    let turns = Arc::new(Semaphore::new(HANDSHAKES_AT_ONCE));
    tokio::spawn(async move {
        loop {
            let (io, remote) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "Cannot accept a connection.");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if ready.is_closed() {
                return;
            }
            let (config, ready, divert, turns) = (config.clone(), ready.clone(), divert.clone(), turns.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(io, config, &turns)).await {
                    Ok(Ok(stream)) => {
                        let certs = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .map(|c| c.to_vec())
                            .unwrap_or_default();
                        let info = PeerInfo {
                            remote,
                            certs: Arc::new(certs.into_iter().map(|c| c.into_owned()).collect()),
                        };
                        let connection = TlsConnection {
                            stream,
                            info,
                            replay: Vec::new(),
                        };
                        match divert {
                            // A task of its own, so that this one's handshake state is freed now.
                            Some(divert) => {
                                let diverting = divert(connection);
                                tokio::spawn(async move {
                                    if let Some(undiverted) = diverting.await {
                                        let _ = ready.send(Ok(undiverted));
                                    }
                                });
                            }
                            None => {
                                let _ = ready.send(Ok(connection));
                            }
                        }
                    }
                    Ok(Err(e)) => tracing::debug!(?remote, error = %e, "TLS handshake failed."),
                    Err(_) => tracing::debug!(?remote, "TLS handshake timed out."),
                }
            });
        }
    });
    UnboundedReceiverStream::new(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_stream::StreamExt;

    /// A listener on loopback with a self-signed certificate; its address and a client config trusting it.
    async fn listener() -> (
        SocketAddr,
        UnboundedReceiverStream<io::Result<TlsConnection<TcpStream>>>,
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
        (address, incoming(listener, config, None), Arc::new(client))
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
        assert!(ready.next().await.unwrap().is_ok());

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
