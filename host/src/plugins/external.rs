//! Tools the runtime offers but does not run itself: those of external MCP
//! servers (see `crate::mcp`).
//!
//! Whoever runs them publishes a snapshot ([`ExternalTools`]) into the
//! catalog; from then on planners, LLMs, task validation and the agent loop
//! see those tools exactly like a component's, and
//! [`PluginRuntime::invoke_tool`](super::PluginRuntime::invoke_tool) hands
//! their calls to the snapshot's [`ToolInvoker`]. The runtime knows nothing
//! of how they run.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;

use super::CallError;
use crate::protocol::{CallContext, ToolSpec};

/// Runs the tools of one external source.
#[async_trait::async_trait]
pub trait ToolInvoker: Send + Sync {
    /// Runs `tool` (its name in the catalog) with a JSON object as input.
    async fn invoke(
        &self,
        tool: &str,
        context: &CallContext,
        input: &Value,
    ) -> Result<Value, CallError>;
}

/// One external tool as the catalog holds it.
#[derive(Clone)]
pub struct ExternalTool {
    pub spec: Arc<ToolSpec>,
    /// Who offers it, as a step's `plugin` names it (`mcp:github`).
    pub source: String,
    pub invoker: Arc<dyn ToolInvoker>,
}

/// Every external tool at one moment, and how their sources are doing.
#[derive(Default, Clone)]
pub struct ExternalTools {
    tools: BTreeMap<String, ExternalTool>,
    /// What `GET /v1/plugins` shows of each source (its own view).
    sources: Vec<Value>,
    /// Whether a source is still making its first start: until it has,
    /// a tool no one offers yet may be one of its.
    starting: bool,
}

impl ExternalTools {
    pub fn new(tools: impl IntoIterator<Item = ExternalTool>, sources: Vec<Value>) -> Self {
        Self {
            tools: tools
                .into_iter()
                .map(|tool| (tool.spec.name.clone(), tool))
                .collect(),
            sources,
            starting: false,
        }
    }

    /// Marks whether a source is still making its first start.
    pub fn with_starting(mut self, starting: bool) -> Self {
        self.starting = starting;
        self
    }

    pub fn starting(&self) -> bool {
        self.starting
    }

    pub fn get(&self, name: &str) -> Option<&ExternalTool> {
        self.tools.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tools.keys().map(String::as_str)
    }

    pub fn sources(&self) -> &[Value] {
        &self.sources
    }
}
