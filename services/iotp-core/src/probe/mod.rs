//! Probes of a running service from outside it, for the load tool, the DLQ CLI and the
//! integration tests: a small HTTP/1.1 client for the admin and API ports, a reader of the
//! Prometheus text the admin port serves, and a wait for a port to open.
//!
//! The client does blocking I/O on std's `TcpStream` ([`blocking`]): the CLI and the tests are
//! synchronous. The async forms ([`get`], [`wait_for_port`]) run the same code on tokio's
//! blocking pool, so a probe never stalls a runtime thread.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// How long a probe of a local port waits for the connection and the whole answer.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Pause between two connection attempts while waiting for a port.
const RETRY: Duration = Duration::from_millis(50);

/// An HTTP answer, whatever its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code (`200`, `503`, …).
    pub status: u16,
    /// Body, de-chunked, as UTF-8 (invalid bytes replaced).
    pub body: String,
}

impl Response {
    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Why a probe got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Connecting, writing or reading failed (refused, reset, unresolvable address).
    #[error("{addr}: {error}")]
    Io {
        /// `host:port` probed.
        addr: String,
        /// What the OS said (in the message, not chained: it would be said twice).
        error: io::Error,
    },
    /// The connection or the whole answer took longer than allowed.
    #[error("{addr}: no answer within {within:?}")]
    Timeout {
        /// `host:port` probed.
        addr: String,
        /// The time allowed.
        within: Duration,
    },
    /// Something answered, but not with an HTTP response.
    #[error("{addr}: malformed HTTP response ({what})")]
    Malformed {
        /// `host:port` probed.
        addr: String,
        /// The part that could not be read.
        what: &'static str,
    },
    /// Nothing accepted a connection on the port in time.
    #[error("nothing listens on port {port} after {within:?}")]
    NotListening {
        /// Local port waited for.
        port: u16,
        /// How long it was waited for.
        within: Duration,
    },
    /// The blocking task behind an async probe panicked or was cancelled.
    #[error("probe task failed: {0}")]
    Task(String),
}

/// The blocking forms, for synchronous callers (the DLQ CLI, integration tests).
pub mod blocking {
    use super::*;

    /// GET `path` on `127.0.0.1:port`, within [`TIMEOUT`].
    pub fn get(port: u16, path: &str) -> Result<Response, ProbeError> {
        request(
            &format!("127.0.0.1:{port}"),
            "GET",
            path,
            None,
            Some(TIMEOUT),
        )
    }

    /// One request to `addr` (`host:port`) with a JSON `body` if one is given, on a connection
    /// of its own (`Connection: close`). `timeout` bounds the connection and the whole answer;
    /// `None` waits as long as the server takes (a CLI the user can interrupt).
    pub fn request(
        addr: &str,
        method: &str,
        path: &str,
        body: Option<&str>,
        timeout: Option<Duration>,
    ) -> Result<Response, ProbeError> {
        request_with_headers(addr, method, path, &[], body, timeout)
    }

    /// [`request`] with extra request headers (`Authorization`, …). A header whose name or
    /// value holds a line break is an error: it would start another header.
    pub fn request_with_headers(
        addr: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
        timeout: Option<Duration>,
    ) -> Result<Response, ProbeError> {
        if headers
            .iter()
            .any(|(name, value)| name.contains(['\r', '\n']) || value.contains(['\r', '\n']))
        {
            return Err(ProbeError::Io {
                addr: addr.to_string(),
                error: io::Error::new(io::ErrorKind::InvalidInput, "line break in a header"),
            });
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        let failed = |error: io::Error| match error.kind() {
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => ProbeError::Timeout {
                addr: addr.to_string(),
                within: timeout.unwrap_or_default(),
            },
            _ => ProbeError::Io {
                addr: addr.to_string(),
                error,
            },
        };
        let mut stream = connect(addr, timeout).map_err(failed)?;
        stream.set_write_timeout(timeout).map_err(failed)?;
        stream
            .write_all(&encode_request(addr, method, path, headers, body))
            .map_err(failed)?;
        let raw = read_to_end(&mut stream, deadline).map_err(failed)?;
        parse_response(&raw).map_err(|what| ProbeError::Malformed {
            addr: addr.to_string(),
            what,
        })
    }

    /// Wait until something accepts connections on `127.0.0.1:port`, for at most `within`.
    pub fn wait_for_port(port: u16, within: Duration) -> Result<(), ProbeError> {
        let deadline = Instant::now() + within;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() >= deadline {
                return Err(ProbeError::NotListening { port, within });
            }
            std::thread::sleep(RETRY);
        }
        Ok(())
    }
}

/// GET `path` on `127.0.0.1:port` within [`TIMEOUT`], off the async runtime's threads.
pub async fn get(port: u16, path: &str) -> Result<Response, ProbeError> {
    let path = path.to_string();
    off_runtime(move || blocking::get(port, &path)).await
}

/// Wait until something accepts connections on `127.0.0.1:port`, off the runtime's threads.
pub async fn wait_for_port(port: u16, within: Duration) -> Result<(), ProbeError> {
    off_runtime(move || blocking::wait_for_port(port, within)).await
}

async fn off_runtime<T: Send + 'static>(
    probe: impl FnOnce() -> Result<T, ProbeError> + Send + 'static,
) -> Result<T, ProbeError> {
    tokio::task::spawn_blocking(probe)
        .await
        .map_err(|e| ProbeError::Task(e.to_string()))?
}

fn connect(addr: &str, timeout: Option<Duration>) -> io::Result<TcpStream> {
    let Some(timeout) = timeout else {
        return TcpStream::connect(addr);
    };
    let mut last = io::Error::new(io::ErrorKind::InvalidInput, "no address to connect to");
    for resolved in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&resolved, timeout) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn encode_request(
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Vec<u8> {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    } else {
        request.push_str("\r\n");
    }
    request.into_bytes()
}

/// Everything until the server closes the connection, or a timeout once `deadline` passed.
fn read_to_end(stream: &mut TcpStream, deadline: Option<Instant>) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            stream.set_read_timeout(Some(left))?;
        }
        match stream.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn parse_response(raw: &[u8]) -> Result<Response, &'static str> {
    let end = find(raw, b"\r\n\r\n").ok_or("no end of the headers")?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| "headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let mut status_line = lines.next().unwrap_or_default().split_whitespace();
    if !status_line.next().is_some_and(|v| v.starts_with("HTTP/")) {
        return Err("no status line");
    }
    let status = status_line
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or("no status code")?;
    let (mut chunked, mut length) = (false, None);
    for (name, value) in lines.filter_map(|l| l.split_once(':')) {
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("content-length") {
            length = value.parse::<usize>().ok();
        }
    }
    let rest = &raw[end + 4..];
    let body = match (chunked, length) {
        (true, _) => dechunk(rest)?,
        (false, Some(n)) => rest
            .get(..n)
            .ok_or("body shorter than its length")?
            .to_vec(),
        (false, None) => rest.to_vec(),
    };
    Ok(Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// The body of a `Transfer-Encoding: chunked` answer (trailers ignored).
fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, &'static str> {
    let mut out = Vec::new();
    loop {
        let line_end = find(data, b"\r\n").ok_or("chunk size without line end")?;
        let size = std::str::from_utf8(&data[..line_end])
            .ok()
            .and_then(|line| line.split(';').next())
            .and_then(|hex| usize::from_str_radix(hex.trim(), 16).ok())
            .ok_or("bad chunk size")?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(data.get(..size).ok_or("chunk shorter than its size")?);
        data = data.get(size + 2..).ok_or("chunk without line end")?;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// One sample line of Prometheus text exposition: `name{labels} value`.
struct Sample<'a> {
    name: &'a str,
    /// The text between the braces (`stage="parser",le="0.1"`), empty without labels.
    labels: &'a str,
    value: f64,
}

impl<'a> Sample<'a> {
    /// Whether the labels hold every `label="value"` given, as written in the text.
    fn has(&self, wanted: &[&str]) -> bool {
        wanted.iter().all(|w| self.labels.contains(w))
    }

    /// The value of label `key` (label values without commas or escaped quotes, as ours are).
    fn label(&self, key: &str) -> Option<&'a str> {
        self.labels.split(',').find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (k.trim() == key).then(|| v.trim().trim_matches('"'))
        })
    }
}

fn samples(text: &str) -> impl Iterator<Item = Sample<'_>> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let (name, labels) = key.split_once('{').unwrap_or((key, ""));
            Some(Sample {
                name,
                labels: labels.trim_end_matches('}'),
                value: value.parse().ok()?,
            })
        })
}

/// Sum of a metric's samples whose labels contain every `label="value"` given; `None` when
/// the text has no such sample (the metric is not exported, or not with those labels).
pub fn find_sum(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    samples(text)
        .filter(|s| s.name == name && s.has(labels))
        .map(|s| s.value)
        .reduce(|a, b| a + b)
}

/// [`find_sum`], with 0 when there is no such sample.
pub fn sample_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    find_sum(text, name, labels).unwrap_or(0.0)
}

/// The distinct values `label` takes on a metric's samples, sorted.
pub fn label_values(text: &str, name: &str, label: &str) -> Vec<String> {
    let mut out: Vec<String> = samples(text)
        .filter(|s| s.name == name)
        .filter_map(|s| s.label(label).map(String::from))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Quantile `q` of a histogram (`{name}_bucket{le=…}` samples whose labels contain every
/// `label="value"` given), by linear interpolation inside the bucket as Prometheus'
/// `histogram_quantile` does; in the histogram's unit. `None` for an empty histogram.
pub fn histogram_quantile(text: &str, name: &str, labels: &[&str], q: f64) -> Option<f64> {
    let bucket = format!("{name}_bucket");
    let mut buckets: Vec<(f64, f64)> = samples(text)
        .filter(|s| s.name == bucket && s.has(labels))
        .filter_map(|s| Some((s.label("le")?.parse::<f64>().ok()?, s.value)))
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for (le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let inside = (rank - prev.1) / (count - prev.1).max(f64::MIN_POSITIVE);
            return Some(prev.0 + (le - prev.0) * inside);
        }
        prev = (le, count);
    }
    None
}

#[cfg(test)]
mod tests;
