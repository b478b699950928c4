//! The `planner` world: task state in, next action out. A planner never
//! performs effects; the host performs the action and journals it as a step.

use std::marker::PhantomData;

use crate::__private::planner::exports::opspawn::plugin::planning::Guest;
pub use crate::__private::planner::exports::opspawn::plugin::planning::{
    Action, EarlierTask, Step, TaskState, ToolCallOutcome,
};

/// A planner component. Exported with
/// [`register_planner!`](crate::register_planner).
pub trait Planner {
    /// The next action for a task in `state`; an `Err` fails the task with
    /// the `planner_error` code and this message.
    fn next_action(state: TaskState) -> Result<Action, String>;
}

/// The bindings' view of a [`Planner`] (for the macro).
#[doc(hidden)]
pub struct PlannerExport<P>(PhantomData<P>);

impl<P: Planner> Guest for PlannerExport<P> {
    fn next_action(state: TaskState) -> Result<Action, String> {
        P::next_action(state)
    }
}
