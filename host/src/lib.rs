//! Opspawn: an agent runtime. A host process runs the task scheduler, the
//! persistent store and the APIs; tools, planners and LLM adapters are
//! sandboxed WebAssembly components loaded at runtime.
//!
//! The modules follow the architecture (see `docs/architecture.md`):
//! - [`protocol`]: the neutral types every part speaks;
//! - [`plugins`]: the plugin runtime (wasmtime), knows nothing of the store;
//! - [`store`]: the persistent store (sqlx), knows nothing of HTTP or plugins;
//! - [`scheduler`]: the dispatcher, leases and the agent loop, joining the two;
//! - [`api`]: the REST API (axum) over the scheduler and store;
//! - [`mcp`]: MCP through `rmcp`: external MCP servers' tools in the registry;
//! - [`cli`] and [`config`]: the `opspawn` command.

pub mod api;
pub mod cli;
pub mod config;
pub mod events;
pub mod mcp;
pub mod plugins;
pub mod protocol;
pub mod scheduler;
pub mod server;
pub mod store;
