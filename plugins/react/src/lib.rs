//! A ReAct planner (reason + act): it alternates LLM calls with tool calls
//! until the LLM gives a final answer.
//!
//! The planner is pure: it reads the task state and decides the next action;
//! the host performs it and journals the outcome as a step. All the logic is
//! in [`planner`]; this file only exports it.

pub mod planner;

wit_bindgen::generate!({
    world: "planner",
    path: "../../wit/v0.2.0",
    // Lets the unit tests compare whole actions.
    additional_derives: [PartialEq],
});

use exports::opspawn::plugin::planning::{Action, Guest, TaskState};

struct React;

impl Guest for React {
    fn next_action(state: TaskState) -> Result<Action, String> {
        planner::next_action(&state)
    }
}

// The exported symbols are named like `opspawn:plugin/planning@0.2.0#next-action`,
// which a native linker refuses in a shared library: export them only when
// building the component, so a host-target `cargo build` or `cargo test` works.
#[cfg(target_arch = "wasm32")]
export!(React);
