//! Prometheus metrics. The host records through the `metrics` facade: a
//! counter or histogram is found by name and labels and updated
//! atomically, and while no recorder is installed (metrics off) each
//! recording is a no-op. `GET /metrics` renders the recorder installed by
//! [`recorder`].
//!
//! Labels take bounded values only: tenants (configured with tokens),
//! plugin names (loaded by the operator), step kinds, codes from the one
//! table (a tool's own codes are all `tool_error`), routes as declared, and
//! at most [`MAX_MODELS`] model names. Never a task id or free text.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use metrics::{
    Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram, histogram,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};

use crate::errors::Code;

pub const HTTP_REQUESTS: &str = "opspawn_http_requests_total";
pub const HTTP_REQUEST_DURATION: &str = "opspawn_http_request_duration_seconds";
pub const TASKS: &str = "opspawn_tasks";
pub const TASKS_SUBMITTED: &str = "opspawn_tasks_submitted_total";
pub const TASKS_FINISHED: &str = "opspawn_tasks_finished_total";
pub const QUEUE_DEPTH: &str = "opspawn_queue_depth";
pub const QUEUE_OLDEST_AGE: &str = "opspawn_queue_oldest_age_seconds";
pub const RUNNING_TASKS: &str = "opspawn_running_tasks";
pub const STEP_DURATION: &str = "opspawn_step_duration_seconds";
pub const STEP_RETRIES: &str = "opspawn_step_retries_total";
pub const PLUGIN_CALL_DURATION: &str = "opspawn_plugin_call_duration_seconds";
pub const LLM_TOKENS: &str = "opspawn_llm_tokens_total";
pub const STORE_OPERATION_DURATION: &str = "opspawn_store_operation_duration_seconds";
pub const PLUGIN_LOADS: &str = "opspawn_plugin_loads_total";
pub const PLUGINS_LOADED: &str = "opspawn_plugins_loaded";
pub const PLUGIN_LOAD_FAILURES: &str = "opspawn_plugin_load_failures";

/// Histogram buckets, in seconds: from a store write to a slow LLM call.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0,
];

/// How many distinct model names get their own label; later ones are
/// `other`, since a task names its model freely.
pub const MAX_MODELS: usize = 64;

/// `[metrics]`: whether `GET /metrics` is served, and the token it needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Record metrics and serve them at `GET /metrics`.
    pub enabled: bool,
    /// Hex SHA-256 of the token a scraper must send as
    /// `Authorization: Bearer <token>` (`opspawn token new` makes one); the
    /// endpoint is open when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_sha256: Option<String>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            token_sha256: None,
        }
    }
}

static RECORDER: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's Prometheus recorder, installed on first use. One per
/// process: the facade has one global recorder.
pub fn recorder() -> &'static PrometheusHandle {
    RECORDER.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(SECONDS_BUCKETS)
            .expect("the bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("another metrics recorder was installed first; /metrics stays empty");
        }
        describe();
        handle
    })
}

/// A histogram handle found once the recorder is installed, so that later
/// recordings skip building its key and looking it up (a label list
/// allocated and hashed, a map searched). Until then, and with metrics
/// off, each recording finds its handle anew, so nothing recorded before
/// the recorder existed is lost.
#[derive(Default)]
pub struct CachedHistogram(OnceLock<Histogram>);

impl CachedHistogram {
    pub const fn new() -> Self {
        Self(OnceLock::new())
    }

    /// Records `value` in the histogram `find` finds (it is called at most
    /// once after the recorder is installed).
    pub fn record(&self, value: Duration, find: impl FnOnce() -> Histogram) {
        match self.0.get() {
            Some(histogram) => histogram.record(value),
            None if RECORDER.get().is_some() => self.0.get_or_init(find).record(value),
            None => find().record(value),
        }
    }
}

/// Histogram samples wait in the recorder until a scrape or this upkeep
/// folds them in: without it, a server nobody scrapes would grow.
pub async fn keep_up(handle: &'static PrometheusHandle) {
    let mut ticks = tokio::time::interval(Duration::from_secs(5));
    loop {
        ticks.tick().await;
        handle.run_upkeep();
    }
}

fn describe() {
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests answered, by method, route (as declared) and status"
    );
    describe_histogram!(
        HTTP_REQUEST_DURATION,
        Unit::Seconds,
        "Time to answer an HTTP request (to the first byte of a stream), by method and route"
    );
    describe_gauge!(
        TASKS,
        "Tasks queued or running in the store (every host), by tenant and status"
    );
    describe_counter!(
        TASKS_SUBMITTED,
        "Tasks created through this host, by tenant"
    );
    describe_counter!(
        TASKS_FINISHED,
        "Tasks finished (succeeded, failed, cancelled) on this host, by tenant and status"
    );
    describe_gauge!(
        QUEUE_DEPTH,
        "Tasks queued in the store, those scheduled for later included"
    );
    describe_gauge!(
        QUEUE_OLDEST_AGE,
        Unit::Seconds,
        "How long the oldest queued task that may run has waited (0 when none)"
    );
    describe_gauge!(RUNNING_TASKS, "Tasks running on this host");
    describe_histogram!(
        STEP_DURATION,
        Unit::Seconds,
        "Time a step took, retries included, by kind (llm, tool), plugin and outcome"
    );
    describe_counter!(
        STEP_RETRIES,
        "Steps tried again after a transient error, by kind and error code"
    );
    describe_histogram!(
        PLUGIN_CALL_DURATION,
        Unit::Seconds,
        "Time a plugin call took, by plugin, kind (tool, planner, llm-adapter) and outcome \
         (ok, or an error code; a tool's own codes are tool_error)"
    );
    describe_counter!(
        LLM_TOKENS,
        "LLM tokens, by adapter, model and direction (input, output)"
    );
    describe_histogram!(
        STORE_OPERATION_DURATION,
        Unit::Seconds,
        "Time a store operation took, by operation and outcome (ok, error)"
    );
    describe_counter!(
        PLUGIN_LOADS,
        "Plugin files loaded, by outcome (loaded, or the load failure's code)"
    );
    describe_gauge!(PLUGINS_LOADED, "Plugins loaded now, by kind");
    describe_gauge!(
        PLUGIN_LOAD_FAILURES,
        "Plugin files in the folder that are not loaded, by code"
    );
}

/// `code` if it is in the one table, else `tool_error`: a tool's own codes
/// are free text.
pub fn code_label(code: &str) -> &'static str {
    Code::ALL
        .iter()
        .find(|known| known.as_str() == code)
        .map_or("tool_error", |known| known.as_str())
}

/// `ok`, or the error's code as [`code_label`] bounds it.
pub fn outcome_label<T>(result: &Result<T, impl AsRef<str>>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(code) => code_label(code.as_ref()),
    }
}

/// The model as a label: the first [`MAX_MODELS`] names seen keep their
/// own, later ones are `other`; no model named is `default`.
pub fn model_label(model: Option<&str>) -> String {
    static SEEN: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let Some(model) = model else {
        return "default".to_owned();
    };
    let mut seen = SEEN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let seen = seen.get_or_insert_with(HashSet::new);
    if seen.contains(model) {
        return model.to_owned();
    }
    if seen.len() < MAX_MODELS {
        seen.insert(model.to_owned());
        return model.to_owned();
    }
    "other".to_owned()
}

/// The histogram of plugin calls by `plugin` (of `kind`) that ended with
/// `outcome`.
pub fn plugin_calls(
    plugin: impl Into<metrics::SharedString>,
    kind: &'static str,
    outcome: &'static str,
) -> Histogram {
    histogram!(
        PLUGIN_CALL_DURATION,
        "plugin" => plugin,
        "kind" => kind,
        "outcome" => outcome,
    )
}

/// Records the tokens of one LLM reply.
pub fn llm_tokens(adapter: &str, model: Option<&str>, input: u64, output: u64) {
    let model = model_label(model);
    counter!(LLM_TOKENS, "adapter" => adapter.to_owned(), "model" => model.clone(), "direction" => "input")
        .increment(input);
    counter!(LLM_TOKENS, "adapter" => adapter.to_owned(), "model" => model, "direction" => "output")
        .increment(output);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_stay_bounded() {
        assert_eq!(code_label("plugin_trap"), "plugin_trap");
        assert_eq!(code_label("division_by_zero"), "tool_error");
        assert_eq!(code_label("task 0189-… failed"), "tool_error");
        assert_eq!(outcome_label::<()>(&Err("llm_timeout")), "llm_timeout");
        assert_eq!(outcome_label::<()>(&Ok::<(), &str>(())), "ok");

        assert_eq!(model_label(None), "default");
        let names: Vec<String> = (0..MAX_MODELS * 2)
            .map(|i| model_label(Some(&format!("labels-stay-bounded-{i}"))))
            .collect();
        assert!(
            names.iter().filter(|name| *name != "other").count() <= MAX_MODELS,
            "no more than {MAX_MODELS} model names get their own label"
        );
        assert_eq!(names.last().map(String::as_str), Some("other"));
    }
}
