//! Tests of the probes against tiny servers spawned in the test.
use std::net::TcpListener;
use std::thread::JoinHandle;

use super::*;

const TEXT: &str = "# HELP iotp_dead_letters_total x\n\
    iotp_dead_letters_total{reason=\"malformed_payload\",stage=\"parser\"} 3\n\
    iotp_dead_letters_total{reason=\"unknown_device\",stage=\"enricher\"} 4\n\
    iotp_messages_stored_total 12\n\
    iotp_delivery_seconds_bucket{stage=\"parser\",le=\"0.01\"} 50\n\
    iotp_delivery_seconds_bucket{stage=\"parser\",le=\"0.1\"} 100\n\
    iotp_delivery_seconds_bucket{stage=\"parser\",le=\"+Inf\"} 100\n\
    iotp_delivery_seconds_bucket{stage=\"enricher\",le=\"+Inf\"} 0\n";

#[test]
fn samples_are_summed_by_label_and_quantiles_interpolated() {
    let parser = ["stage=\"parser\""];
    assert_eq!(sample_sum(TEXT, "iotp_dead_letters_total", &[]), 7.0);
    assert_eq!(sample_sum(TEXT, "iotp_dead_letters_total", &parser), 3.0);
    assert_eq!(
        find_sum(TEXT, "iotp_messages_stored_total", &[]),
        Some(12.0)
    );
    assert_eq!(
        find_sum(TEXT, "iotp_messages", &[]),
        None,
        "names match whole"
    );
    assert_eq!(sample_sum(TEXT, "iotp_absent_total", &[]), 0.0);
    assert_eq!(
        label_values(TEXT, "iotp_delivery_seconds_bucket", "stage"),
        ["enricher", "parser"]
    );
    let q = |labels: &[&str], q| histogram_quantile(TEXT, "iotp_delivery_seconds", labels, q);
    assert_eq!(q(&parser, 0.5), Some(0.01));
    let p75 = q(&parser, 0.75).expect("p75");
    assert!((p75 - 0.055).abs() < 1e-9, "{p75}");
    assert_eq!(q(&["stage=\"enricher\""], 0.5), None, "empty histogram");
}

/// Whether `request` holds its headers and as many body bytes as they announce.
fn complete(request: &[u8]) -> bool {
    let text = String::from_utf8_lossy(request);
    text.split_once("\r\n\r\n").is_some_and(|(head, body)| {
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .and_then(|n| n.parse().ok());
        body.len() >= length.unwrap_or(0)
    })
}

/// A server answering the first request it gets with `answer` (connections that close
/// without one, such as a port check's, are passed over); that request.
fn serve_once(answer: &'static str) -> (u16, JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = std::thread::spawn(move || loop {
        let (mut stream, _) = listener.accept().expect("accept");
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !complete(&request) {
            match stream.read(&mut buf).expect("read") {
                0 => break,
                n => request.extend_from_slice(&buf[..n]),
            }
        }
        if !request.is_empty() {
            stream.write_all(answer.as_bytes()).expect("write");
            return String::from_utf8(request).expect("utf-8");
        }
    });
    (port, server)
}

#[test]
fn a_get_returns_status_and_body_of_any_answer() {
    let (port, server) = serve_once("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello");
    let r = blocking::get(port, "/metrics").expect("answer");
    assert_eq!(
        (r.status, r.body.as_str(), r.is_success()),
        (200, "hello", true)
    );
    let request = server.join().expect("server");
    assert!(
        request.starts_with("GET /metrics HTTP/1.1\r\n"),
        "{request}"
    );
    assert!(request.contains("\r\nConnection: close\r\n"), "{request}");

    let (port, _server) = serve_once(
        "HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n\
         4\r\nnot \r\n5;x=y\r\nready\r\n0\r\n\r\n",
    );
    let r = blocking::get(port, "/readyz").expect("answer");
    assert_eq!(
        (r.status, r.body.as_str(), r.is_success()),
        (503, "not ready", false)
    );
}

#[test]
fn a_request_carries_its_json_body() {
    let (port, server) = serve_once("HTTP/1.1 204 No Content\r\n\r\n");
    let addr = format!("127.0.0.1:{port}");
    let r = blocking::request(&addr, "POST", "/replay", Some("{}"), None).expect("answer");
    assert_eq!(r.status, 204);
    let request = server.join().expect("server");
    assert!(
        request.contains("Content-Type: application/json\r\n"),
        "{request}"
    );
    assert!(
        request.ends_with("Content-Length: 2\r\n\r\n{}"),
        "{request}"
    );
}

#[test]
fn a_request_carries_its_headers_and_refuses_one_that_would_split() {
    let (port, server) = serve_once("HTTP/1.1 204 No Content\r\n\r\n");
    let addr = format!("127.0.0.1:{port}");
    let auth = [("Authorization", "Bearer abc")];
    let r = blocking::request_with_headers(&addr, "GET", "/x", &auth, None, None).expect("answer");
    assert_eq!(r.status, 204);
    let request = server.join().expect("server");
    assert!(
        request.contains("\r\nAuthorization: Bearer abc\r\n"),
        "{request}"
    );
    let split = [("Authorization", "Bearer abc\r\nX-Evil: 1")];
    let refused = blocking::request_with_headers(&addr, "GET", "/x", &split, None, None);
    assert!(matches!(refused, Err(ProbeError::Io { .. })), "{refused:?}");
}

#[test]
fn silence_garbage_and_closed_ports_are_errors() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let addr = format!("127.0.0.1:{port}");
    let silent = blocking::request(&addr, "GET", "/", None, Some(Duration::from_millis(200)));
    assert!(
        matches!(silent, Err(ProbeError::Timeout { .. })),
        "{silent:?}"
    );
    drop(listener);
    let closed = blocking::get(port, "/");
    assert!(matches!(closed, Err(ProbeError::Io { .. })), "{closed:?}");
    let gone = blocking::wait_for_port(port, Duration::from_millis(100));
    assert!(
        matches!(gone, Err(ProbeError::NotListening { .. })),
        "{gone:?}"
    );

    let (port, _server) = serve_once("SSH-2.0-OpenSSH\r\n\r\n");
    let garbage = blocking::get(port, "/");
    assert!(
        matches!(garbage, Err(ProbeError::Malformed { .. })),
        "{garbage:?}"
    );
}

#[tokio::test]
async fn the_async_forms_answer_like_the_blocking_ones() {
    let (port, _server) = serve_once("HTTP/1.0 200 OK\r\n\r\nok");
    wait_for_port(port, Duration::from_secs(5))
        .await
        .expect("open");
    let r = get(port, "/healthz").await.expect("answer");
    assert_eq!((r.status, r.body.as_str()), (200, "ok"));
}
