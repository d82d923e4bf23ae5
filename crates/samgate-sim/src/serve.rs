//! The listener every simulator serves on (HTTPS with a fresh self-signed certificate, its
//! SHA-256 fingerprint returned for pinning, or plain HTTP), and the few HTTP helpers they
//! share: random tokens, the bearer token of a request, an nginx-style HTML error page.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::Engine;
use sha2::{Digest, Sha256};

/// A simulator's HTTP server, running.
pub struct Served {
    pub addr: SocketAddr,
    /// `https://127.0.0.1:PORT` (or `http://`).
    pub url: String,
    /// SHA-256 fingerprint of the certificate (HTTPS only), colon-separated upper-case hex.
    pub fingerprint: Option<String>,
    pub handle: axum_server::Handle,
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Served {
    /// Stops serving and waits for the server to end.
    pub async fn stop(self) {
        self.handle.shutdown();
        let _ = self.task.await;
    }
}

/// SHA-256 of a DER certificate as `AB:CD:…`, the form `openssl x509 -fingerprint -sha256`
/// prints and samgate's `tls.fingerprint_sha256` accepts.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Binds `listen` and serves `app` on it, over TLS when `tls`. Returns once it listens.
pub fn serve(listen: SocketAddr, tls: bool, app: Router) -> anyhow::Result<Served> {
    let listener = TcpListener::bind(listen)?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let handle = axum_server::Handle::new();
    if !tls {
        let server = axum_server::from_tcp(listener).handle(handle.clone());
        let task =
            tokio::spawn(server.serve(app.into_make_service_with_connect_info::<SocketAddr>()));
        return Ok(Served {
            addr,
            url: format!("http://{addr}"),
            fingerprint: None,
            handle,
            task,
        });
    }
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])?;
    let der = certified.cert.der().clone();
    let fingerprint = fingerprint(der.as_ref());
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
        certified.key_pair.serialize_der(),
    ));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![der], key)?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    let config = axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(server));
    let server = axum_server::from_tcp_rustls(listener, config).handle(handle.clone());
    let task = tokio::spawn(server.serve(app.into_make_service_with_connect_info::<SocketAddr>()));
    Ok(Served {
        addr,
        url: format!("https://{addr}"),
        fingerprint: Some(fingerprint),
        handle,
        task,
    })
}

/// Random-looking text (URL-safe base64 of a hash of time, process and a counter).
pub fn random_token(bytes: usize) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut out = Vec::new();
    while out.len() < bytes {
        let seed = format!(
            "{:?}/{}/{}/{}",
            SystemTime::now(),
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            out.len()
        );
        out.extend_from_slice(&Sha256::digest(seed.as_bytes()));
    }
    out.truncate(bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(out)
}

/// The token of an `Authorization: Bearer <token>` header (the scheme in any case).
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

pub fn html(status: StatusCode, title: &str) -> Response {
    let body = format!("<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n<center><h1>{title}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n");
    (status, [(header::CONTENT_TYPE, "text/html")], body).into_response()
}

/// A client that accepts the simulators' self-signed certificates (their unit tests).
#[cfg(test)]
pub(crate) fn test_client() -> reqwest::Client {
    reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()
        .expect("a client")
}
