//! The upstream pool against HTTPS servers on port 0: HTTP/2 when ALPN negotiates it (one
//! connection shared by concurrent requests), HTTP/1.1 over TLS otherwise (connections reused).
//! The servers use a test certificate for `localhost` signed by a test CA
//! (`tests/fixtures/tls`, valid until 2126), which the client is built to trust.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aigate_core::client::{build_client_with_roots, HttpClient};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls").join(name)
}

/// Starts an HTTPS server offering `alpn`; answers every request with its HTTP version. Returns
/// its port and the count of connections it accepted.
async fn tls_server(alpn: &[&[u8]]) -> (u16, Arc<AtomicU64>) {
    let certs = vec![CertificateDer::from_pem_file(fixture("server.pem")).unwrap()];
    let key = PrivateKeyDer::from_pem_file(fixture("server.key")).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            count.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let svc = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    let version = format!("{:?}", req.version());
                    let path = req.uri().path().to_owned();
                    let _ = req.into_body().collect().await;
                    // A little latency, so concurrent requests overlap.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(format!("{version} {path}")))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (port, accepted)
}

fn client() -> HttpClient {
    client_with(64)
}

/// A client opening at most `max_connections` connections to one host.
fn client_with(max_connections: usize) -> HttpClient {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(fixture("ca.pem")).unwrap()).unwrap();
    let settings = aigate_core::config::UpstreamSettings {
        connect_timeout: Duration::from_secs(5),
        pool_idle_timeout: Duration::from_secs(90),
        pool_max_idle_per_host: 16,
        max_connections_per_host: max_connections,
    };
    build_client_with_roots(&settings, roots).unwrap()
}

async fn get(client: &HttpClient, port: u16, path: &str) -> String {
    let mut req = http::Request::new(Full::new(Bytes::from_static(b"{}")));
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = format!("https://localhost:{port}{path}").parse().unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_is_negotiated_and_one_connection_carries_concurrent_requests() {
    let (port, accepted) = tls_server(&[b"h2", b"http/1.1"]).await;
    let client = client();
    assert_eq!(get(&client, port, "/v1/first").await, "HTTP/2.0 /v1/first");
    let answers = futures_util::future::join_all((0..10).map(|i| {
        let client = client.clone();
        async move { get(&client, port, &format!("/v1/c{i}")).await }
    }))
    .await;
    for (i, a) in answers.iter().enumerate() {
        assert_eq!(a, &format!("HTTP/2.0 /v1/c{i}"));
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "one HTTP/2 connection for all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_over_tls_reuses_its_connections() {
    let (port, accepted) = tls_server(&[b"http/1.1"]).await;
    let client = client();
    for i in 0..5 {
        assert_eq!(get(&client, port, &format!("/v1/s{i}")).await, format!("HTTP/1.1 /v1/s{i}"));
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "sequential requests share one connection");
    let answers = futures_util::future::join_all((0..4).map(|i| {
        let client = client.clone();
        async move { get(&client, port, &format!("/v1/p{i}")).await }
    }))
    .await;
    assert!(answers.iter().all(|a| a.starts_with("HTTP/1.1 ")), "{answers:?}");
    let opened = accepted.load(Ordering::SeqCst);
    assert!((2..=4).contains(&opened), "{opened}: concurrent requests open connections side by side");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_one_host_are_bounded_and_requests_wait_for_one() {
    let (port, accepted) = tls_server(&[b"http/1.1"]).await;
    let client = client_with(3);
    // 24 requests of 20 ms at once over at most 3 connections: they take turns, none fails.
    let answers = futures_util::future::join_all((0..24).map(|i| {
        let client = client.clone();
        async move { get(&client, port, &format!("/v1/b{i}")).await }
    }))
    .await;
    for (i, a) in answers.iter().enumerate() {
        assert_eq!(a, &format!("HTTP/1.1 /v1/b{i}"));
    }
    let opened = accepted.load(Ordering::SeqCst);
    assert!((1..=3).contains(&opened), "{opened} connections opened for a bound of 3");
}
