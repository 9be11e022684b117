//! TLS 1.3 for the peer channel (DESIGN.md "Trust and keys", issue 6), pinned
//! by node id instead of a CA.
//!
//! Every agent presents a self-signed certificate for its Ed25519 identity
//! key. A certificate proves nothing by itself; what counts is its key: the
//! TLS 1.3 handshake signature (CertificateVerify, RFC 8446 §4.4.3) shows the
//! peer holds that key, and the node id is `identity::node_id_of(key)`. So:
//! - a client pins the callee: the server's key must hash to the node id it
//!   meant to call ([`PinnedServer`]); a seed probed before joining, whose id
//!   is not known yet, is accepted with any Ed25519 key and its id recorded
//!   ([`PinnedServer::learn`]);
//! - a server requires a client certificate with an Ed25519 key
//!   ([`AnyNodeClient`]) and derives the caller's node id from it; whether
//!   that node is an admitted member is the service's decision (a joiner
//!   must be able to say `Hello` before it is a member).
//!
//! Pure apart from the handshake objects: no sockets, no agent state.

use std::sync::{Arc, Mutex};

use ring::signature::{ED25519, UnparsedPublicKey};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig,
    SignatureScheme,
};

use crate::ids::NodeId;
use crate::keys::identity::node_id_of;

/// ALPN for gRPC over our own TLS (tonic speaks HTTP/2 on the stream).
pub const ALPN_H2: &[u8] = b"h2";

/// The fixed DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410 §4):
/// SEQUENCE { SEQUENCE { OID 1.3.101.112 } BIT STRING (0 unused bits) }.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

#[derive(thiserror::Error, PartialEq, Eq)]
pub enum TlsError {
    #[error("certificate does not parse: {0}")]
    BadCertificate(String),
    #[error("certificate key is not Ed25519")]
    NotEd25519,
    #[error("certificate key belongs to node {got}, not the node called ({want})")]
    WrongNode { want: NodeId, got: NodeId },
    #[error("build certificate from the identity key: {0}")]
    Build(String),
    #[error("TLS configuration: {0}")]
    Config(String),
}

// rustls prints a verifier's own error with `{:?}`: make that the message.
impl std::fmt::Debug for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

impl TlsError {
    fn into_rustls(self) -> rustls::Error {
        let e = match self {
            Self::NotEd25519 => CertificateError::BadEncoding,
            Self::BadCertificate(_) => CertificateError::BadEncoding,
            other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
        };
        rustls::Error::InvalidCertificate(e)
    }
}

/// The raw Ed25519 public key of a certificate.
pub fn ed25519_key(cert: &CertificateDer<'_>) -> Result<[u8; 32], TlsError> {
    let parsed = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    let spki = parsed.subject_public_key_info();
    let spki = spki.as_ref();
    let key = spki
        .strip_prefix(&ED25519_SPKI_PREFIX[..])
        .ok_or(TlsError::NotEd25519)?;
    key.try_into().map_err(|_| TlsError::NotEd25519)
}

/// The node id a certificate stands for: SHA-256 of its Ed25519 key, cut.
pub fn node_id_of_cert(cert: &CertificateDer<'_>) -> Result<NodeId, TlsError> {
    Ok(node_id_of(&ed25519_key(cert)?))
}

/// Checks a TLS 1.3 handshake signature against the certificate's key.
/// Only Ed25519 is offered and accepted.
fn verify_ed25519(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    check_signature(message, cert, dss.scheme, dss.signature())?;
    Ok(HandshakeSignatureValid::assertion())
}

fn check_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    scheme: SignatureScheme,
    signature: &[u8],
) -> Result<(), rustls::Error> {
    if scheme != SignatureScheme::ED25519 {
        return Err(rustls::Error::PeerMisbehaved(
            rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme,
        ));
    }
    let key = ed25519_key(cert).map_err(TlsError::into_rustls)?;
    UnparsedPublicKey::new(&ED25519, key)
        .verify(message, signature)
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadSignature))
}

fn tls12_refused() -> Result<HandshakeSignatureValid, rustls::Error> {
    // The configs below allow TLS 1.3 only; this is never reached.
    Err(rustls::Error::General("TLS 1.2 is not offered".into()))
}

/// Client side: the server's key must hash to `expect`; with no expectation
/// (a seed before joining) any Ed25519 key passes and its node id is kept in
/// `learned` for the caller to check against what the seed claims.
#[derive(Debug)]
pub struct PinnedServer {
    expect: Option<NodeId>,
    learned: Mutex<Option<NodeId>>,
}

impl PinnedServer {
    pub fn to(expect: NodeId) -> Arc<Self> {
        Arc::new(Self {
            expect: Some(expect),
            learned: Mutex::new(None),
        })
    }

    pub fn learn() -> Arc<Self> {
        Arc::new(Self {
            expect: None,
            learned: Mutex::new(None),
        })
    }

    /// The server's node id once a handshake passed.
    pub fn learned(&self) -> Option<NodeId> {
        *self.learned.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The certificate check alone (unit-tested without a handshake).
    pub fn check(&self, cert: &CertificateDer<'_>) -> Result<NodeId, TlsError> {
        let got = node_id_of_cert(cert)?;
        if let Some(want) = self.expect
            && want != got
        {
            return Err(TlsError::WrongNode { want, got });
        }
        *self.learned.lock().unwrap_or_else(|e| e.into_inner()) = Some(got);
        Ok(got)
    }
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity).map_err(TlsError::into_rustls)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_ed25519(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// Server side: a client certificate is mandatory and must carry an Ed25519
/// key; membership is checked per call by the service.
#[derive(Debug)]
pub struct AnyNodeClient;

impl ClientCertVerifier for AnyNodeClient {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        node_id_of_cert(end_entity).map_err(TlsError::into_rustls)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_ed25519(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// This node's certificate and key, built once at start-up from the
/// identity key (PKCS#8, as `identity.pk8` holds it).
pub struct TlsIdentity {
    pub node_id: NodeId,
    cert: CertificateDer<'static>,
    pkcs8: Vec<u8>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsIdentity {
    /// A self-signed certificate for the Ed25519 key in `pkcs8`. Its
    /// subject names the node id for operators reading a capture or a
    /// `openssl s_client` dump; verifiers only look at the key.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, TlsError> {
        let der = PrivatePkcs8KeyDer::from(pkcs8);
        let key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_ED25519)
            .map_err(|e| TlsError::Build(e.to_string()))?;
        let node_id = node_id_of(key.public_key_raw());
        let mut params = rcgen::CertificateParams::new(vec![format!("ovl-{node_id}")])
            .map_err(|e| TlsError::Build(e.to_string()))?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("ovl node {node_id}"));
        let cert = params
            .self_signed(&key)
            .map_err(|e| TlsError::Build(e.to_string()))?;
        Ok(Self {
            node_id,
            cert: cert.der().clone(),
            pkcs8: pkcs8.to_vec(),
        })
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.pkcs8.clone()))
    }

    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The listener's configuration: TLS 1.3 only, client certificate
    /// required, ALPN h2.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(Arc::new(AnyNodeClient))
            .with_single_cert(vec![self.cert.clone()], self.key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Arc::new(cfg))
    }

    /// A client configuration pinned by `verifier`, presenting our
    /// certificate.
    pub fn client_config(
        &self,
        verifier: Arc<PinnedServer>,
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(vec![self.cert.clone()], self.key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        // No SNI: the callee is named by its key, not by a host name.
        cfg.enable_sni = false;
        Ok(Arc::new(cfg))
    }
}

/// The name handed to rustls (the callee's address); verifiers ignore it:
/// the callee is named by its key.
pub fn server_name(addr: std::net::SocketAddr) -> ServerName<'static> {
    ServerName::IpAddress(addr.ip().into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{Ed25519KeyPair, KeyPair};

    fn node() -> (TlsIdentity, Ed25519KeyPair) {
        let pk8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        let kp = Ed25519KeyPair::from_pkcs8(pk8.as_ref()).unwrap();
        (TlsIdentity::from_pkcs8(pk8.as_ref()).unwrap(), kp)
    }

    #[test]
    fn certificate_key_is_the_identity_key_and_names_its_node() {
        let (tls, kp) = node();
        assert_eq!(
            ed25519_key(tls.certificate()).unwrap(),
            kp.public_key().as_ref()
        );
        assert_eq!(tls.node_id, node_id_of(kp.public_key().as_ref()));
        assert_eq!(node_id_of_cert(tls.certificate()).unwrap(), tls.node_id);
    }

    #[test]
    fn pin_accepts_the_callee_and_refuses_any_other_node() {
        let (a, _) = node();
        let (b, _) = node();
        assert_eq!(
            PinnedServer::to(a.node_id).check(a.certificate()),
            Ok(a.node_id)
        );
        assert_eq!(
            PinnedServer::to(a.node_id).check(b.certificate()),
            Err(TlsError::WrongNode {
                want: a.node_id,
                got: b.node_id
            })
        );
        let learn = PinnedServer::learn();
        assert_eq!(learn.learned(), None);
        assert_eq!(learn.check(b.certificate()), Ok(b.node_id));
        assert_eq!(learn.learned(), Some(b.node_id));
    }

    #[test]
    fn non_ed25519_and_garbage_certificates_are_refused() {
        let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".to_string()])
            .unwrap()
            .self_signed(&p256)
            .unwrap();
        assert_eq!(node_id_of_cert(cert.der()), Err(TlsError::NotEd25519));
        let verifier = AnyNodeClient;
        assert!(
            verifier
                .verify_client_cert(cert.der(), &[], UnixTime::now())
                .is_err()
        );
        let junk = CertificateDer::from(vec![0x30, 0x03, 0x01, 0x01, 0xff]);
        assert!(matches!(
            node_id_of_cert(&junk),
            Err(TlsError::BadCertificate(_))
        ));
    }

    #[test]
    fn handshake_signatures_verify_only_under_the_certificate_key() {
        let (a, ka) = node();
        let (_, kb) = node();
        let msg = b"tls 1.3 transcript";
        let ed = SignatureScheme::ED25519;
        let good = ka.sign(msg);
        assert!(check_signature(msg, a.certificate(), ed, good.as_ref()).is_ok());
        let forged = kb.sign(msg);
        assert!(check_signature(msg, a.certificate(), ed, forged.as_ref()).is_err());
        let p256 = SignatureScheme::ECDSA_NISTP256_SHA256;
        assert!(check_signature(msg, a.certificate(), p256, good.as_ref()).is_err());
        assert!(check_signature(b"other transcript", a.certificate(), ed, good.as_ref()).is_err());
    }

    #[tokio::test]
    async fn handshake_pins_both_ways() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (server, _) = node();
        let (client, _) = node();
        let (other, _) = node();
        let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config().unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let srv = tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..2 {
                let (tcp, _) = listener.accept().await.unwrap();
                match acceptor.accept(tcp).await {
                    Ok(mut tls) => {
                        let (_, conn) = tls.get_ref();
                        let cert = conn.peer_certificates().unwrap()[0].clone();
                        seen.push(node_id_of_cert(&cert).unwrap());
                        let _ = tls.write_all(b"ok").await;
                        let _ = tls.shutdown().await;
                    }
                    Err(_) => continue,
                }
            }
            seen
        });
        // Pinned to the right node: passes, and the server sees our id.
        let good = tokio_rustls::TlsConnector::from(
            client
                .client_config(PinnedServer::to(server.node_id))
                .unwrap(),
        );
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut tls = good.connect(server_name(addr), tcp).await.unwrap();
        let mut buf = Vec::new();
        tls.read_to_end(&mut buf).await.unwrap();
        assert_eq!(buf, b"ok");
        // Pinned to another node: the client refuses the server.
        let wrong = tokio_rustls::TlsConnector::from(
            client
                .client_config(PinnedServer::to(other.node_id))
                .unwrap(),
        );
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let err = wrong.connect(server_name(addr), tcp).await.unwrap_err();
        assert!(err.to_string().contains("not the node called"), "{err}");
        assert_eq!(srv.await.unwrap(), vec![client.node_id]);
    }

    /// Server side: no client certificate, or one with a P-256 key, fails
    /// the handshake; an Ed25519 one passes (membership is the service's
    /// check).
    #[tokio::test]
    async fn server_requires_an_ed25519_client_certificate() {
        let (server, _) = node();
        let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config().unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let srv = tokio::spawn(async move {
            let mut results = Vec::new();
            for _ in 0..3 {
                let (tcp, _) = listener.accept().await.unwrap();
                results.push(acceptor.accept(tcp).await.is_ok());
            }
            results
        });
        let builder = || {
            ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .dangerous()
                .with_custom_certificate_verifier(PinnedServer::to(server.node_id))
        };
        let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let p256_cert = rcgen::CertificateParams::new(vec!["x".to_string()])
            .unwrap()
            .self_signed(&p256)
            .unwrap();
        let p256_key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(p256.serialize_der()));
        let (ed, _) = node();
        let clients = [
            builder().with_no_client_auth(),
            builder()
                .with_client_auth_cert(vec![p256_cert.der().clone()], p256_key)
                .unwrap(),
            (*ed.client_config(PinnedServer::to(server.node_id)).unwrap()).clone(),
        ];
        for cfg in clients {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
            // In TLS 1.3 the client may finish before the server judges
            // its certificate: the verdict is the server's.
            if let Ok(mut tls) = connector.connect(server_name(addr), tcp).await {
                use tokio::io::AsyncWriteExt;
                let _ = tls.write_all(b"x").await;
                let _ = tls.flush().await;
            }
        }
        assert_eq!(srv.await.unwrap(), vec![false, false, true]);
    }
}
