//! The HTTPS client for a management server: CA verification by default, or a pinned SHA-256
//! fingerprint of the leaf certificate that fails closed, or (labs only) no verification.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use tracing::warn;

use crate::config::TlsConfig;

/// SHA-256 of a certificate's DER, as colon-separated upper-case hex (the form operators copy).
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Accepts exactly one certificate, identified by the SHA-256 of its DER encoding; signatures
/// on the handshake are still verified with that certificate's key.
#[derive(Debug)]
struct PinnedCertificate {
    /// 64 lower-case hex digits.
    expected: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = fingerprint(end_entity.as_ref());
        if crate::config::normalize_fingerprint(&presented) == self.expected {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "certificate fingerprint mismatch (possible man-in-the-middle, or the server's certificate was replaced): expected SHA-256 {}, presented {presented}",
                colon_hex(&self.expected)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn colon_hex(hex: &str) -> String {
    hex.as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).to_ascii_uppercase())
        .collect::<Vec<_>>()
        .join(":")
}

/// Builds the HTTP client for one server. `server` names it in the warning and errors.
pub fn http_client(
    server: &str,
    tls: &TlsConfig,
    timeout: Duration,
) -> Result<reqwest::Client, String> {
    let builder = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .user_agent(concat!("samgate/", env!("CARGO_PKG_VERSION")))
        .pool_idle_timeout(Duration::from_secs(60));
    let builder = if let Some(expected) = tls.normalized_fingerprint() {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS set-up: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCertificate { expected, provider }))
            .with_no_client_auth();
        builder.use_preconfigured_tls(config)
    } else if tls.insecure_skip_verify {
        warn!(server, "TLS verification is OFF for this management server (tls.insecure_skip_verify): anyone on the path can read its credentials; pin tls.fingerprint_sha256 instead");
        builder.use_rustls_tls().danger_accept_invalid_certs(true)
    } else {
        let mut builder = builder.use_rustls_tls();
        if let Some(path) = &tls.ca_file {
            let pem =
                std::fs::read(path).map_err(|e| format!("tls.ca_file {}: {e}", path.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("tls.ca_file {}: {e}", path.display()))?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        builder
    };
    builder
        .build()
        .map_err(|e| format!("HTTP client for {server}: {e}"))
}

/// Whether a transport error is TLS refusing the server's certificate (a configuration matter),
/// as opposed to a connection that broke (`peer closed connection without sending TLS
/// close_notify`, a handshake cut short), which is worth retrying.
pub fn refused_certificate(detail: &str) -> bool {
    let lower = detail.to_ascii_lowercase();
    [
        "certificate",
        "fingerprint",
        "unknownissuer",
        "bad signature",
    ]
    .iter()
    .any(|needle| lower.contains(needle))
}

/// An HTTP client error with every cause it wraps (`…: connection refused`), which is where
/// reqwest says what actually happened.
pub fn error_chain(error: &reqwest::Error) -> String {
    let mut detail = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        detail.push_str(": ");
        detail.push_str(&inner.to_string());
        source = inner.source();
    }
    detail
}
