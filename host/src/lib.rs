//! Opspawn: an agent runtime. A host process runs the task scheduler, the
//! persistent store and the APIs; tools, planners and LLM adapters are
//! sandboxed WebAssembly components loaded at runtime.
//!
//! The modules follow the architecture (see `docs/architecture.md`):
//! - [`protocol`]: the neutral types every part speaks; [`errors`]: every
//!   stable error code, in one table; [`rfc3339`]: times on the wire;
//!   [`sse`]: server-sent events read from a stream of bytes;
//!   [`metrics`]: what the host counts and times, for Prometheus;
//!   [`telemetry`]: the log, and OpenTelemetry traces over OTLP;
//!   [`budgets`]: prices, cost and the checks made before an LLM call;
//!   [`approvals`]: which tool calls wait for a person's approval;
//!   [`memory`]: long-term memory, its caps, queries and journal keys;
//!   [`structured`]: a task's response format, and its answer checked
//!   against it;
//! - [`plugins`]: the plugin runtime (wasmtime), knows nothing of the store;
//! - [`store`]: the persistent store (sqlx), knows nothing of HTTP or plugins;
//! - [`scheduler`]: the dispatcher, leases and the agent loop, joining the two;
//! - [`api`]: the REST API (axum) over the scheduler and store;
//! - [`mcp`]: MCP through `rmcp`: external MCP servers' tools in the registry,
//!   and Opspawn served to MCP clients;
//! - [`cli`], [`config`] and [`server`]: the `opspawn` command, its
//!   settings and the wiring of `opspawn serve`; [`authoring`]: the
//!   `opspawn plugin` commands that write, build, check and install plugins.
//!
//! The core (`protocol`, `errors`, `budgets`, `approvals`, `memory`, `structured`, `rfc3339`, `sse`, `events`, `metrics`,
//! `telemetry`, `store`, `plugins`, `scheduler`) imports nothing from the edges (`api`, `cli`, `config`,
//! `server`, `authoring`): the edges turn configuration and requests into the core's own
//! option types. A test below scans the sources to keep it so.

pub mod api;
pub mod approvals;
pub mod authoring;
pub mod budgets;
pub mod cli;
pub mod config;
pub mod errors;
pub mod events;
pub mod grpc;
pub mod images;
pub mod mcp;
pub mod memory;
pub mod metrics;
pub mod plugins;
pub mod protocol;
pub mod rfc3339;
pub mod scheduler;
pub mod schedules;
pub mod server;
pub mod sse;
pub mod store;
pub mod structured;
pub mod telemetry;
pub mod threads;

/// Makes ring the process's rustls crypto provider, as every reqwest client
/// (the CLI's, the MCP client's, the trace exporter's) needs one installed
/// before it is built. Call it first thing; calling it again does nothing.
pub fn install_tls_provider() {
    // An error means a provider is installed already, which is all we need.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod test_support;

#[cfg(test)]
mod tests {
    use crate::test_support::{repo_root, rust_files};

    /// The modules the core is made of, and the edge modules it must not
    /// import (see the module comment).
    const CORE: &[&str] = &[
        "protocol.rs",
        "errors.rs",
        "budgets.rs",
        "approvals.rs",
        "memory.rs",
        "structured.rs",
        "rfc3339.rs",
        "sse.rs",
        "events.rs",
        "metrics.rs",
        "telemetry.rs",
        "store",
        "plugins",
        "scheduler",
        "schedules",
    ];
    const EDGES: &[&str] = &["api", "authoring", "cli", "config", "server"];

    /// The edge modules `text` names through `crate::`, plain or grouped
    /// (`crate::api::x`, `crate::{api, store}`).
    fn edge_imports(text: &str) -> Vec<String> {
        let mut found = Vec::new();
        for (at, _) in text.match_indices("crate::") {
            let rest = &text[at + "crate::".len()..];
            let names: Vec<&str> = match rest.strip_prefix('{') {
                Some(group) => group
                    .split('}')
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .collect(),
                None => vec![rest],
            };
            for name in names {
                let name = name
                    .trim_start()
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .next()
                    .unwrap_or_default();
                if EDGES.contains(&name) {
                    found.push(format!("crate::{name}"));
                }
            }
        }
        found
    }

    #[test]
    fn the_core_imports_nothing_from_the_edges() {
        let src = repo_root().join("host/src");
        let mut offenders = Vec::new();
        for part in CORE {
            let files = rust_files(&src.join(part));
            assert!(!files.is_empty(), "host/src/{part} has no Rust sources");
            for (path, text) in files {
                for import in edge_imports(&text) {
                    offenders.push(format!("{} uses {import}", path.display()));
                }
            }
        }
        assert!(
            offenders.is_empty(),
            "the core must not depend on the API, CLI, configuration or server \
             (move the item into the core, or pass it in):\n{}",
            offenders.join("\n")
        );
    }

    #[test]
    fn the_scan_sees_plain_and_grouped_imports() {
        assert_eq!(edge_imports("use crate::api::timestamp;"), ["crate::api"]);
        assert_eq!(
            edge_imports("use crate::{store::Store, config::Config};"),
            ["crate::config"]
        );
        assert_eq!(edge_imports("crate::cli::run(x)"), ["crate::cli"]);
        assert!(edge_imports("use crate::store::api_key; crate::apis").is_empty());
    }
}
