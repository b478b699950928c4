//! What the server tells operators about itself as it runs: the log, on
//! stderr and filtered by `OPSPAWN_LOG`, and OpenTelemetry traces, exported
//! over OTLP (HTTP/protobuf) when the standard `OTEL_EXPORTER_OTLP_ENDPOINT`
//! or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` variable is set, and off
//! otherwise.
//!
//! Spans meant for traces are `tracing` spans with the target
//! [`TRACE_TARGET`]; the log never shows them, and the exporter sees only
//! them, so log lines and traces can be tuned apart. Their names and
//! attributes follow the OpenTelemetry GenAI conventions (`invoke_agent`,
//! `chat`, `execute_tool`, `gen_ai.*`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

/// The `tracing` target of every span that becomes part of a trace.
pub const TRACE_TARGET: &str = "opspawn::trace";

/// The log filter when `OPSPAWN_LOG` is not set.
const DEFAULT_LOG_FILTER: &str = "warn,opspawn=info";

static TRACES_ON: AtomicBool = AtomicBool::new(false);

/// Whether spans are being exported. Work done only for traces (finding a
/// request's parent, keeping a task's trace context) is skipped when not.
pub fn traces_on() -> bool {
    TRACES_ON.load(Ordering::Relaxed)
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
            .unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER))
            .add_directive(
                format!("{TRACE_TARGET}=off")
                    .parse()
                    .expect("a valid directive"),
            );
        let log = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_filter(log_filter);
        let (provider, problem) = match export_traces.then(TraceSettings::from_env).flatten() {
            Some(Ok(settings)) => match settings.provider() {
                Ok(provider) => (Some(provider), None),
                Err(error) => (None, Some(format!("traces are off: {error}"))),
            },
            Some(Err(problem)) => (None, Some(problem)),
            None => (None, None),
        };
        let traces = provider.as_ref().map(|provider| {
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("opspawn"))
                // Only what the spans say: no source locations, thread ids
                // or busy/idle timings on every span.
                .with_location(false)
                .with_threads(false)
                .with_tracked_inactivity(false)
                .with_target(false)
                .with_level(false)
                .with_filter(Targets::new().with_target(TRACE_TARGET, tracing::Level::INFO))
        });
        Registry::default().with(log).with(traces).init();
        if let Some(problem) = problem {
            tracing::error!("{problem}");
        }
        if provider.is_some() {
            opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
            TRACES_ON.store(true, Ordering::Relaxed);
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
/// handler), to be kept with a task so that every run of it continues the
/// trace; `None` when traces are off. Log spans are not part of traces, so
/// this is the OpenTelemetry context, not `tracing`'s current span.
pub fn current_traceparent() -> Option<String> {
    if !traces_on() {
        return None;
    }
    let context = opentelemetry::Context::current();
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

/// Makes `span` a child of the span a W3C `traceparent` (and `tracestate`)
/// names, when traces are on and the value is well formed.
pub fn continue_trace<'a>(
    span: &tracing::Span,
    traceparent: Option<&'a str>,
    tracestate: Option<&'a str>,
) {
    let Some(traceparent) = traceparent.filter(|_| traces_on()) else {
        return;
    };
    let mut carrier = HashMap::with_capacity(2);
    carrier.insert("traceparent".to_owned(), traceparent.to_owned());
    if let Some(tracestate) = tracestate {
        carrier.insert("tracestate".to_owned(), tracestate.to_owned());
    }
    let parent = TraceContextPropagator::new().extract(&carrier);
    if parent.span().span_context().is_valid() {
        // Fails only when the span is not traced, which is then harmless.
        let _ = span.set_parent(parent);
    }
}
