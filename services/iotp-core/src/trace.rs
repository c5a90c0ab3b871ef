//! Tracing: the W3C trace context every message carries, and the spans the runtime records.
//!
//! - **Propagation** (always on): a device's MQTT 5 user property `traceparent` becomes the
//!   `traceparent` Kafka header of its raw record ([`for_publish`]); the runtime copies an
//!   input's header onto every output made from it ([`carry`]) and onto its dead letter (an
//!   AMQP header of the same name), and the DLQ handler keeps it through the delay queues,
//!   parking and replays. A stage never touches it.
//! - **Spans** (only when an OTLP endpoint is configured, [`TracingConfig`]): one span per
//!   batch per stage (and per bridge flush, per DLQ delivery) with a **link** to the trace
//!   context of each message it carries (at most `max_links`), and a child span per store
//!   write (`iotp_store`'s `store {operation}`). The bridge starts a trace (random ids,
//!   sampled) for a message whose device sent none. Spans leave through the SDK's batch span
//!   processor (bounded queue, its own thread, flushed at shutdown) and the OTLP/HTTP protobuf
//!   exporter. Without an endpoint nothing is installed: no ids are made, no span is started,
//!   and the store's spans are no-ops.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    Link, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
    Tracer,
};
use opentelemetry::{global, Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use serde::{Deserialize, Serialize};

use crate::stage::Output;

/// The W3C trace context header, in Kafka and AMQP headers and as an MQTT 5 user property.
pub const HEADER: &str = "traceparent";

/// Name of the tracer the runtime's spans come from (the instrumentation scope).
pub const TRACER: &str = "iotp";

static ENABLED: AtomicBool = AtomicBool::new(false);
static MAX_LINKS: AtomicUsize = AtomicUsize::new(128);

/// Whether spans are recorded and exported (an endpoint is configured and the exporter is
/// installed). When not, the runtime starts no span and makes no trace id.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Span export (`[common.tracing]`). Off unless an endpoint is set here or in the standard
/// OpenTelemetry environment variables.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// OTLP/HTTP base URL of the collector, e.g. `http://otel-collector:4318`: spans are sent
    /// to `{otlp_endpoint}/v1/traces` as protobuf. Empty: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
    /// (used as it is) or `OTEL_EXPORTER_OTLP_ENDPOINT` (a base URL) if set, else no export;
    /// `OTEL_SDK_DISABLED=true` turns it off whatever is set.
    /// Plain `http://` only: this build has no TLS for the exporter (send to a collector agent
    /// on the node or in the pod). `OTEL_EXPORTER_OTLP_HEADERS` adds request headers.
    pub otlp_endpoint: String,
    /// How often the batch span processor sends what it holds.
    #[serde(with = "humantime_serde")]
    pub export_interval: Duration,
    /// Most spans waiting for export; when it is full, new spans are dropped (never waited
    /// for: a slow collector never slows a stage).
    pub queue_size: usize,
    /// Most spans in one export request.
    pub export_batch_size: usize,
    /// How long one export request may take.
    #[serde(with = "humantime_serde")]
    pub export_timeout: Duration,
    /// Most links a batch span carries to the traces of its messages; the messages past it
    /// are counted in the span's `iotp.links.dropped`.
    pub max_links: usize,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            export_interval: Duration::from_secs(5),
            queue_size: 2048,
            export_batch_size: 512,
            export_timeout: Duration::from_secs(10),
            max_links: 128,
        }
    }
}

impl TracingConfig {
    /// Where spans go (`…/v1/traces`); `None`: export is off.
    pub fn traces_url(&self) -> Option<String> {
        self.traces_url_from(|name| std::env::var(name).ok())
    }

    fn traces_url_from(&self, env: impl Fn(&str) -> Option<String>) -> Option<String> {
        if env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return None;
        }
        let signal = |base: &str| format!("{}/v1/traces", base.trim_end_matches('/'));
        if !self.otlp_endpoint.is_empty() {
            return Some(signal(&self.otlp_endpoint));
        }
        if let Some(url) = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").filter(|u| !u.is_empty()) {
            return Some(url);
        }
        env("OTEL_EXPORTER_OTLP_ENDPOINT")
            .filter(|u| !u.is_empty())
            .map(|base| signal(&base))
    }

    /// Rules for `validate()`.
    pub fn problems(&self) -> Vec<String> {
        self.problems_with(self.traces_url())
    }

    fn problems_with(&self, url: Option<String>) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(url) = url {
            if !url.starts_with("http://") {
                out.push(format!(
                    "common.tracing: the OTLP endpoint {} must be an http:// URL (no TLS in this exporter: send to a collector agent)",
                    iotp_contract::redact::uri(&url)
                ));
            }
        }
        if self.queue_size == 0 {
            out.push("common.tracing.queue_size must be at least 1".into());
        }
        if self.export_batch_size == 0 || self.export_batch_size > self.queue_size {
            out.push("common.tracing.export_batch_size must be between 1 and queue_size".into());
        }
        if self.export_interval.is_zero() || self.export_timeout.is_zero() {
            out.push("common.tracing.export_interval and export_timeout must be > 0".into());
        }
        if !(1..=1024).contains(&self.max_links) {
            out.push("common.tracing.max_links must be between 1 and 1024".into());
        }
        out
    }
}

/// The installed exporter; [`Tracing::shutdown`] sends what is still queued.
#[must_use = "call shutdown() before the process exits, or queued spans are lost"]
pub struct Tracing {
    provider: Option<SdkTracerProvider>,
    timeout: Duration,
}

/// Install the OTLP exporter for `service` (`iotp-{service}` is its `service.name`, the
/// replica its `service.instance.id`) if an endpoint is configured; otherwise do nothing.
pub fn init(service: &str, replica: &str, config: &TracingConfig) -> Result<Tracing, String> {
    let Some(url) = config.traces_url() else {
        return Ok(Tracing {
            provider: None,
            timeout: Duration::ZERO,
        });
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url.clone())
        .with_timeout(config.export_timeout)
        .build()
        .map_err(|e| format!("cannot build the OTLP exporter: {e}"))?;
    let batches = BatchConfigBuilder::default()
        .with_max_queue_size(config.queue_size)
        .with_max_export_batch_size(config.export_batch_size)
        .with_scheduled_delay(config.export_interval)
        .build();
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(batches)
        .build();
    let resource = Resource::builder()
        .with_service_name(format!("iotp-{service}"))
        .with_attributes([
            KeyValue::new("service.instance.id", replica.to_string()),
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        ])
        .build();
    let max_links = config.max_links.clamp(1, 1024);
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource)
        .with_max_links_per_span(max_links as u32)
        .build();
    global::set_tracer_provider(provider.clone());
    MAX_LINKS.store(max_links, Ordering::Relaxed);
    ENABLED.store(true, Ordering::Relaxed);
    tracing::info!(
        endpoint = %iotp_contract::redact::uri(&url),
        "exporting spans over OTLP/HTTP"
    );
    Ok(Tracing {
        provider: Some(provider),
        timeout: config.export_timeout,
    })
}

impl Tracing {
    /// Export what is queued and stop the exporter's thread, waiting at most the export
    /// timeout (a collector that is away does not hold the process up longer).
    pub fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        ENABLED.store(false, Ordering::Relaxed);
        if let Err(e) = provider.shutdown_with_timeout(self.timeout) {
            tracing::warn!(error = %e, "spans not all exported at shutdown");
        }
    }
}

/// A `traceparent` value, parsed: version `00`'s layout (a later version may append fields),
/// lowercase hex, ids not all zero. `None` for anything else (W3C: then start a new trace).
pub fn parse(value: &[u8]) -> Option<SpanContext> {
    let head = value.get(..55)?;
    if head[2] != b'-' || head[35] != b'-' || head[52] != b'-' {
        return None;
    }
    let lower_hex = |b: &[u8]| b.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let (version, trace, span, flags) = (&head[..2], &head[3..35], &head[36..52], &head[53..55]);
    if ![version, trace, span, flags]
        .iter()
        .all(|part| lower_hex(part))
        || version == b"ff"
    {
        return None;
    }
    if (version == b"00" && value.len() != 55) || (value.len() > 55 && value[55] != b'-') {
        return None;
    }
    let trace = u128::from_str_radix(std::str::from_utf8(trace).ok()?, 16).ok()?;
    let span = u64::from_str_radix(std::str::from_utf8(span).ok()?, 16).ok()?;
    let flags = u8::from_str_radix(std::str::from_utf8(flags).ok()?, 16).ok()?;
    if trace == 0 || span == 0 {
        return None;
    }
    Some(SpanContext::new(
        TraceId::from_bytes(trace.to_be_bytes()),
        SpanId::from_bytes(span.to_be_bytes()),
        TraceFlags::new(flags),
        true,
        TraceState::default(),
    ))
}

/// The `traceparent` value of `cx` (version 00).
pub fn format(cx: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        cx.trace_id(),
        cx.span_id(),
        cx.trace_flags().to_u8()
    )
}

/// A new trace: random trace and parent ids, sampled.
pub fn start() -> String {
    let trace = rand::random::<u128>().max(1);
    let span = rand::random::<u64>().max(1);
    format!("00-{trace:032x}-{span:016x}-01")
}

/// The trace id of a valid `traceparent` value, for logs.
pub fn trace_id(value: Option<&[u8]>) -> Option<&str> {
    let value = value?;
    parse(value)?;
    std::str::from_utf8(&value[3..35]).ok()
}

/// The `traceparent` of an output, if it has one.
pub fn header(out: &Output) -> Option<&[u8]> {
    out.headers
        .iter()
        .find(|(k, _)| *k == HEADER)
        .map(|(_, v)| v.as_slice())
}

/// Give `out` its input's `traceparent`, unless the stage set one itself.
pub fn carry(traceparent: &[u8], out: &mut Output) {
    if header(out).is_none() {
        out.headers.push((HEADER, traceparent.to_vec()));
    }
}

/// The `traceparent` of a PUBLISH's record: the device's (user property `traceparent`) when
/// valid; else, with export on, a new trace; else none. One the ingress stage set wins.
pub fn for_publish(device: Option<&str>, out: &mut Output) {
    if header(out).is_some() {
        return;
    }
    let value = match device.filter(|v| parse(v.as_bytes()).is_some()) {
        Some(v) => v.as_bytes().to_vec(),
        None if enabled() => start().into_bytes(),
        None => return,
    };
    out.headers.push((HEADER, value));
}

/// The links of a batch span to the traces of the messages it carries, at most `max_links`.
pub struct Links {
    links: Vec<Link>,
    messages: usize,
    traced: usize,
    max: usize,
}

impl Default for Links {
    fn default() -> Self {
        Self {
            links: Vec::new(),
            messages: 0,
            traced: 0,
            max: MAX_LINKS.load(Ordering::Relaxed),
        }
    }
}

impl Links {
    /// Count one message; link its trace if it has a valid context and there is room.
    pub fn add(&mut self, traceparent: Option<&[u8]>) {
        self.messages += 1;
        let Some(cx) = traceparent.and_then(parse) else {
            return;
        };
        self.traced += 1;
        if self.links.len() < self.max {
            self.links.push(Link::with_context(cx));
        }
    }

    /// Messages counted.
    pub fn messages(&self) -> usize {
        self.messages
    }
}

/// Add an attribute to the current span (the batch span the work runs under); nothing when
/// there is none.
pub fn annotate(attribute: KeyValue) {
    Context::map_current(|cx| {
        if cx.has_active_span() {
            cx.span().set_attribute(attribute);
        }
    });
}

/// One span of the runtime's, started as the root of its own trace and linked to the traces
/// of the messages it handles. Its context is what the work runs under
/// ([`opentelemetry::context::FutureExt::with_context`]), so the store's spans are its
/// children; its `log` span puts the trace id on every log line written meanwhile.
pub struct BatchSpan {
    cx: Context,
    log: tracing::Span,
}

impl BatchSpan {
    /// Start span `name` of `kind` at `started` (now if `None`), linked by `links`, with
    /// `attributes`, and the message counts of the links.
    pub fn start(
        name: String,
        kind: SpanKind,
        started: Option<SystemTime>,
        mut attributes: Vec<KeyValue>,
        links: Links,
    ) -> Self {
        let tracer = global::tracer(TRACER);
        attributes.push(KeyValue::new(
            "messaging.batch.message_count",
            links.messages as i64,
        ));
        attributes.push(KeyValue::new(
            "iotp.links.dropped",
            (links.traced - links.links.len()) as i64,
        ));
        let mut builder = tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes)
            .with_links(links.links);
        if let Some(at) = started {
            builder = builder.with_start_time(at);
        }
        let span = builder.start_with_context(&tracer, &Context::new());
        let cx = Context::new().with_span(span);
        let trace_id = cx.span().span_context().trace_id();
        // At error level, so that every log line a filter lets through carries the trace id
        // (an info span would be off under `log_level = "warn"`, and its warnings without it).
        let log = tracing::error_span!("batch", trace_id = %trace_id);
        Self { cx, log }
    }

    /// The context to run the work under.
    pub fn context(&self) -> Context {
        self.cx.clone()
    }

    /// The log span carrying the trace id.
    pub fn log(&self) -> tracing::Span {
        self.log.clone()
    }

    /// Add attributes (outputs, rejections, where a letter went).
    pub fn set(&self, attributes: impl IntoIterator<Item = KeyValue>) {
        self.cx.span().set_attributes(attributes);
    }

    /// End the span, as failed with `error` if the work failed.
    pub fn end(self, error: Option<String>) {
        let span = self.cx.span();
        if let Some(e) = error {
            span.set_status(Status::error(e));
        }
        span.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_reads_back_as_it_was_written() {
        let cx = parse(VALID.as_bytes()).expect("valid");
        assert_eq!(
            format!("{}", cx.trace_id()),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(cx.is_sampled() && cx.is_remote());
        assert_eq!(format(&cx), VALID);
        assert_eq!(
            trace_id(Some(VALID.as_bytes())),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        let later = format!("01{}-more", &VALID[2..]);
        assert!(
            parse(later.as_bytes()).is_some(),
            "a later version may add fields"
        );
    }

    #[test]
    fn invalid_traceparents_are_refused() {
        for bad in [
            "",
            "00-aa-bb-01",
            &VALID[..54],
            &format!("{VALID}-x"),
            &VALID.replace("4bf9", "4BF9"),
            &VALID.replace("4bf92f3577b34da6a3ce929d0e0e4736", &"0".repeat(32)),
            &VALID.replace("00f067aa0ba902b7", &"0".repeat(16)),
            &format!("ff{}", &VALID[2..]),
            &VALID.replacen('-', "_", 1),
            &format!("01{}x", &VALID[2..]),
        ] {
            assert!(parse(bad.as_bytes()).is_none(), "{bad:?}");
            assert_eq!(trace_id(Some(bad.as_bytes())), None, "{bad:?}");
        }
    }

    #[test]
    fn a_started_trace_is_valid_sampled_and_new_each_time() {
        let (a, b) = (start(), start());
        let cx = parse(a.as_bytes()).expect("valid");
        assert!(cx.is_sampled());
        assert_ne!(a[3..35], b[3..35]);
    }

    #[test]
    fn outputs_keep_their_own_traceparent_and_get_their_inputs_otherwise() {
        let mut out = Output::new(b"k".to_vec(), vec![]);
        carry(VALID.as_bytes(), &mut out);
        assert_eq!(header(&out), Some(VALID.as_bytes()));
        let other = start();
        carry(other.as_bytes(), &mut out);
        assert_eq!(header(&out), Some(VALID.as_bytes()), "the first one stays");
        assert_eq!(out.headers.len(), 1);

        let mut record = Output::new(b"k".to_vec(), vec![]);
        for_publish(Some(VALID), &mut record);
        assert_eq!(header(&record), Some(VALID.as_bytes()));
        // Export is off in unit tests: an invalid or missing one starts nothing.
        let mut bare = Output::new(b"k".to_vec(), vec![]);
        for_publish(Some("00-aa-bb-01"), &mut bare);
        for_publish(None, &mut bare);
        assert_eq!(header(&bare), None);
    }

    #[test]
    fn links_are_bounded_and_counted() {
        let mut links = Links {
            max: 2,
            ..Links::default()
        };
        let ids: Vec<String> = (0..4).map(|_| start()).collect();
        for id in &ids {
            links.add(Some(id.as_bytes()));
        }
        links.add(None);
        links.add(Some(b"00-aa-bb-01"));
        assert_eq!((links.messages, links.traced, links.links.len()), (6, 4, 2));
    }

    #[test]
    fn the_endpoint_comes_from_the_config_then_the_standard_variables() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let off = TracingConfig::default();
        assert_eq!(off.traces_url_from(env(&[])), None);
        assert!(off.problems_with(None).is_empty());
        let set = TracingConfig {
            otlp_endpoint: "http://collector:4318/".into(),
            ..TracingConfig::default()
        };
        assert_eq!(
            set.traces_url_from(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://x:1")])),
            Some("http://collector:4318/v1/traces".into())
        );
        assert_eq!(
            off.traces_url_from(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://x:1")])),
            Some("http://x:1/v1/traces".into())
        );
        assert_eq!(
            off.traces_url_from(env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://x:1"),
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://y:2/traces")
            ])),
            Some("http://y:2/traces".into())
        );
        assert_eq!(
            set.traces_url_from(env(&[("OTEL_SDK_DISABLED", "true")])),
            None
        );
        let problems = off.problems_with(Some("https://u:secret@collector:4318".into()));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(!problems[0].contains("secret"), "{problems:?}");
        let bad = TracingConfig {
            queue_size: 0,
            max_links: 0,
            ..TracingConfig::default()
        };
        assert_eq!(bad.problems_with(None).len(), 3);
    }
}
