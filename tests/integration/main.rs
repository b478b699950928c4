//! End-to-end tests: each starts a real `opspawn serve` process on an
//! ephemeral loopback port, with the real compiled plugins, and drives it
//! over HTTP.

mod api;
mod durability;
mod plugins;
mod streaming;

use std::path::Path;
use std::time::Duration;

use opspawn_testkit::{Client, PluginFolder, Server};
use serde_json::{Value, json};

/// Generous: these machines are shared and slow; a pass is usually far quicker.
pub const FINISH: Duration = Duration::from_secs(60);

/// A server with the example plugins and the misbehaving fixture, in its own
/// temporary data directory.
pub struct Harness {
    pub server: Server,
    pub plugins: PluginFolder,
    _data: tempfile::TempDir,
}

/// The misbehaving fixture's manifest: short limits so tests run fast, and a
/// writable folder for the counting tool.
pub const MISBEHAVING_MANIFEST: &str = r#"
[limits]
memory_mib = 32
call_timeout_ms = 1000
max_output_bytes = 65536

[[capabilities.dirs]]
path = "counts"
guest_path = "/counts"
writable = true
"#;

impl Harness {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    pub fn start_with(env: &[(&str, &str)]) -> Self {
        let plugins = PluginFolder::with_examples();
        std::fs::create_dir_all(plugins.path().join("counts")).unwrap();
        plugins.add("misbehaving", "misbehaving", Some(MISBEHAVING_MANIFEST));
        let data = tempfile::tempdir().unwrap();
        let server =
            Server::start(binary(), data.path(), plugins.path(), env).expect("the server starts");
        Self {
            server,
            plugins,
            _data: data,
        }
    }

    pub fn client(&self) -> Client {
        self.server.client()
    }
}

pub fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_opspawn"))
}

/// The three-step task of the README: the scripted LLM asks for the
/// calculator, the calculator answers, the LLM gives the final answer.
pub fn calculator_task(expression: &str, answer: &str) -> Value {
    json!({
        "goal": format!("What is {expression}?"),
        "tools": ["calculator"],
        "options": {"llm": {"script": [
            {"tool_calls": [{"name": "calculator", "arguments": {"expression": expression}}]},
            {"content": format!("Thought: the calculator answered.\nFinal Answer: {answer}")}
        ]}}
    })
}

/// A task whose scripted LLM calls one tool of the misbehaving fixture and
/// then finishes.
pub fn misbehaving_task(tool: &str, arguments: Value) -> Value {
    json!({
        "goal": format!("Call {tool}"),
        "tools": [tool],
        "options": {"llm": {"script": [
            {"tool_calls": [{"name": tool, "arguments": arguments}]},
            {"content": "Final Answer: carried on"}
        ]}}
    })
}

pub fn steps(task: &Value) -> &Vec<Value> {
    task["steps"].as_array().expect("the task has steps")
}
