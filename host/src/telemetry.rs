//! What the server tells operators about itself as it runs: the log, on
//! stderr and filtered by `OPSPAWN_LOG`, and OpenTelemetry traces, exported
//! over OTLP (HTTP/protobuf) when the standard `OTEL_EXPORTER_OTLP_ENDPOINT`
//! or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` variable is set, and off
//! otherwise.
//!
//! Spans meant for traces are OpenTelemetry spans made with the SDK's
//! tracer directly ([`TraceSpan`]), not `tracing` spans: the log and the
//! traces are tuned apart, and a span costs only its start and its end.
//! Through `tracing` (its `tracing-opentelemetry` layer) every poll of an
//! instrumented future also entered and left each span around it; that
//! made metrics and traces together cost about 25 % more server CPU per
//! task, where this costs 11–13 % (`opspawn-bench --only telemetry`).
//!
//! A span's parent is named explicitly: a task's spans are handed down its
//! run, not looked up in a context attached on every poll of its future
//! (two nested scopes, each attached and detached at every poll: about
//! 1.5 % of a traced server's CPU in a profile). Only a request's handler
//! runs in its span's scope ([`TraceSpan::in_scope`]), so that a task it
//! submits finds its parent there.
//! Names and attributes follow the OpenTelemetry GenAI conventions
//! (`invoke_agent`, `chat`, `execute_tool`, `gen_ai.*`).

use std::borrow::Cow;
use std::sync::OnceLock;

use futures::future::Either;
use opentelemetry::context::{FutureExt as _, WithContext};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tracing_subscriber::Registry;
use tracing_subscriber::filter::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The log filter when `OPSPAWN_LOG` is not set.
const DEFAULT_LOG_FILTER: &str = "warn,opspawn=info";

/// The tracer spans are made with, once traces are on.
static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// Whether spans are being exported. Work done only for traces (building a
/// span's attributes, finding a request's parent, keeping a task's trace
/// context) is skipped when not.
pub fn traces_on() -> bool {
    TRACER.get().is_some()
}

/// A span of a trace, or nothing when traces are off. It is held in the
/// OpenTelemetry context it makes current, so a clone is cheap, and the
/// span ends (and is queued for export) when its last clone is dropped.
#[derive(Clone, Default)]
pub struct TraceSpan(Option<Context>);

impl TraceSpan {
    /// No span: what every constructor gives when traces are off.
    pub fn none() -> Self {
        Self(None)
    }

    /// A span under `self`; none when `self` is none.
    pub fn child_of(
        &self,
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        attributes: Vec<KeyValue>,
    ) -> Self {
        match &self.0 {
            Some(parent) => Self::start(parent, name, kind, attributes),
            None => Self::none(),
        }
    }

    /// A span under `self`, or a root when `self` is none and traces are on.
    pub fn child_or_root(
        &self,
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        attributes: Vec<KeyValue>,
    ) -> Self {
        match &self.0 {
            Some(parent) => Self::start(parent, name, kind, attributes),
            None => Self::start(&Context::new(), name, kind, attributes),
        }
    }

    /// A span under the one a W3C `traceparent` (and `tracestate`) names
    /// when it is well formed, else a root.
    pub fn continuing(
        traceparent: Option<&str>,
        tracestate: Option<&str>,
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        attributes: Vec<KeyValue>,
    ) -> Self {
        if !traces_on() {
            return Self::none();
        }
        let parent = traceparent.map_or_else(Context::new, |traceparent| {
            TraceContextPropagator::new().extract(&W3cHeaders {
                traceparent,
                tracestate,
            })
        });
        Self::start(&parent, name, kind, attributes)
    }

    fn start(
        parent: &Context,
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        attributes: Vec<KeyValue>,
    ) -> Self {
        let Some(tracer) = TRACER.get() else {
            return Self::none();
        };
        let span = tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes)
            .start_with_context(tracer, parent);
        Self(Some(parent.with_span(span)))
    }

    /// Whether this is a span (traces are on).
    pub fn is_recording(&self) -> bool {
        self.0.is_some()
    }

    pub fn set_attribute(&self, attribute: KeyValue) {
        if let Some(context) = &self.0 {
            context.span().set_attribute(attribute);
        }
    }

    /// Marks the span failed, saying why.
    pub fn set_error(&self, message: impl Into<Cow<'static, str>>) {
        if let Some(context) = &self.0 {
            context.span().set_status(Status::error(message));
        }
    }

    /// Runs `future` with this span as the current one, so that it is what
    /// [`current_traceparent`] names. Costs nothing when there is no span.
    pub fn in_scope<F: Future>(&self, future: F) -> Either<WithContext<F>, F> {
        match &self.0 {
            Some(context) => Either::Left(future.with_context(context.clone())),
            None => Either::Right(future),
        }
    }
}

/// A W3C trace context's two headers, as the propagator reads them.
struct W3cHeaders<'a> {
    traceparent: &'a str,
    tracestate: Option<&'a str>,
}

impl Extractor for W3cHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => Some(self.traceparent),
            "tracestate" => self.tracestate,
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

/// The log and, when asked for, the trace exporter, until [`Telemetry::shutdown`].
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sets up the log and, when the OTLP variables ask for it, traces.
    /// Call it before the async runtime starts: the exporter builds a
    /// blocking HTTP client, and sends from a thread of its own.
    pub fn init(export_traces: bool) -> Self {
        let log_filter = EnvFilter::try_from_env("OPSPAWN_LOG")
            .unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
        let log = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
        let (provider, problem) = match export_traces.then(TraceSettings::from_env).flatten() {
            Some(Ok(settings)) => match settings.provider() {
                Ok(provider) => (Some(provider), None),
                Err(error) => (None, Some(format!("traces are off: {error}"))),
            },
            Some(Err(problem)) => (None, Some(problem)),
            None => (None, None),
        };
        // The log is the only layer, so its filter is global, not per
        // layer: a per-layer filter keeps a per-thread note of what it
        // enabled, and a library that asks `enabled!` without then logging
        // (sqlx's query logger does, on every Postgres statement) left that
        // note behind, so the next span or line on the thread was dropped.
        Registry::default().with(log_filter).with(log).init();
        if let Some(problem) = problem {
            tracing::error!("{problem}");
        }
        if let Some(provider) = &provider {
            opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
            let _ = TRACER.set(provider.tracer("opspawn"));
            tracing::info!("exporting traces over OTLP (HTTP/protobuf)");
        }
        Self { provider }
    }

    /// Sends the spans still buffered and stops the exporter. Call it
    /// outside the async runtime: the exporter's client blocks.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown()
        {
            eprintln!("warning: sending the last spans failed: {error}");
        }
    }
}

/// What the OTLP variables ask for.
struct TraceSettings {
    service_name_given: bool,
}

impl TraceSettings {
    /// `None` when traces are not asked for, or why they cannot be sent as
    /// asked.
    fn from_env() -> Option<Result<Self, String>> {
        let set = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        if set("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
            || set("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"))
        {
            return None;
        }
        set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| set("OTEL_EXPORTER_OTLP_ENDPOINT"))?;
        let protocol = set("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|| set("OTEL_EXPORTER_OTLP_PROTOCOL"));
        if let Some(protocol) = protocol.filter(|p| p != "http/protobuf") {
            return Some(Err(format!(
                "traces are off: OTLP protocol {protocol:?} is not supported; set \
                 OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf (a collector takes it on port 4318)"
            )));
        }
        if let Some(endpoint) = set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| set("OTEL_EXPORTER_OTLP_ENDPOINT"))
            .filter(|e| !e.starts_with("http://"))
        {
            return Some(Err(format!(
                "traces are off: the OTLP endpoint {endpoint:?} is not http://; this build sends \
                 traces over plain HTTP only, so point it at a collector nearby (such as \
                 http://localhost:4318), which can forward them over TLS"
            )));
        }
        let service_name_given = set("OTEL_SERVICE_NAME").is_some()
            || set("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| a.contains("service.name="));
        Some(Ok(Self { service_name_given }))
    }

    fn provider(&self) -> Result<SdkTracerProvider, String> {
        // Endpoint, headers, timeout and compression come from the standard
        // variables, read by the exporter itself; the batch settings
        // (`OTEL_BSP_*`) and the sampler (`OTEL_TRACES_SAMPLER`) by the SDK.
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
            .map_err(|e| e.to_string())?;
        let mut resource = opentelemetry_sdk::Resource::builder().with_attribute(
            opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        );
        if !self.service_name_given {
            resource = resource.with_service_name("opspawn");
        }
        Ok(SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build())
    }
}

/// The W3C `traceparent` of the trace span being run (the request's, in a
/// handler: see [`TraceSpan::in_scope`]), to be kept with a task so that
/// every run of it continues the trace; `None` when traces are off.
pub fn current_traceparent() -> Option<String> {
    if !traces_on() {
        return None;
    }
    let context = Context::current();
    let span_context = context.span().span_context().clone();
    span_context.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            span_context.trace_id(),
            span_context.span_id(),
            span_context.trace_flags().to_u8()
        )
    })
}
