//! A ReAct planner (reason + act): it alternates LLM calls with tool calls
//! until the LLM gives a final answer.
//!
//! The planner is pure: it reads the task state and decides the next action;
//! the host performs it and journals the outcome as a step. All the logic is
//! in [`planner`]; this file only exports it.

pub mod planner;

use opspawn_plugin::planner::{Action, Planner, TaskState};

struct React;

impl Planner for React {
    fn next_action(state: TaskState) -> Result<Action, String> {
        planner::next_action(&state)
    }
}

opspawn_plugin::register_planner!(React);
