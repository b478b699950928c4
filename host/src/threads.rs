//! Threads: a task may name a conversation thread (a client-chosen id,
//! scoped to its tenant). Its planner is given the thread's earlier tasks
//! (goals, answers and, within a budget, their steps), and the claim runs a
//! thread's tasks one after the other (`thread_is_free!` in the store).
//! See docs/architecture.md, "Threads".

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::protocol::{EarlierTask, PlannerStep};
use crate::store::{HistoryStep, Result, Store, TaskQuery, TaskRecord, TaskStatus};

/// The longest thread id accepted, in bytes.
pub const MAX_THREAD_BYTES: usize = 128;

/// The most earlier tasks a planner may be given (a page of the task list).
pub const MAX_HISTORY_TASKS: u32 = 500;

/// `[threads]`: how much of a thread's past a planner is given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ThreadsConfig {
    /// The most earlier tasks of its thread a task's planner sees: the
    /// newest ones, oldest first (0 to 500; 0 gives none).
    pub history_tasks: u32,
    /// The most bytes (as JSON) of the earlier tasks' steps a planner is
    /// given, the newest tasks' first: a task whose steps do not fit in
    /// what is left is given with its goal and answer only, and so are all
    /// older ones. 0 gives goals and answers only.
    pub history_steps_bytes: usize,
}

impl Default for ThreadsConfig {
    fn default() -> Self {
        Self {
            history_tasks: 20,
            history_steps_bytes: 64 * 1024,
        }
    }
}

/// Why a thread id is refused, or `None` when it is a good one: 1 to 128
/// bytes of ASCII letters, digits, `-`, `_`, `.` and `:`, so it can sit in
/// a URL path unescaped.
pub fn invalid_thread_id(thread: &str) -> Option<String> {
    let good = !thread.is_empty()
        && thread.len() <= MAX_THREAD_BYTES
        && thread
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    (!good).then(|| {
        format!(
            "a thread id is 1 to {MAX_THREAD_BYTES} characters: ASCII letters, digits, '-', \
             '_', '.' and ':'"
        )
    })
}

/// What `task`'s planner is given of its thread: the finished tasks of the
/// thread submitted before it, the newest `history_tasks` of them, oldest
/// first, with their steps as far as the byte budget goes (the newest
/// tasks' first). Nothing for a task without a thread, and no read either.
///
/// Two reads whatever the thread's length: the tasks, then all their steps.
/// A step weighs what the journal holds of it for a planner (a tool's call,
/// the output, the error); only the steps that fit are parsed, by
/// `planner_view`, and an LLM step's request is never read.
pub async fn history(
    store: &dyn Store,
    task: &TaskRecord,
    config: &ThreadsConfig,
    planner_view: impl Fn(&HistoryStep) -> Option<PlannerStep>,
) -> Result<Vec<EarlierTask>> {
    let Some(thread) = &task.thread else {
        return Ok(Vec::new());
    };
    if config.history_tasks == 0 {
        return Ok(Vec::new());
    }
    let page = store
        .list_tasks(&TaskQuery {
            tenant: Some(task.tenant.clone()),
            thread: Some(thread.clone()),
            before: Some(task.id.clone()),
            limit: config.history_tasks.min(MAX_HISTORY_TASKS),
            ..TaskQuery::default()
        })
        .await?;
    // Newest first: the newest tasks' steps are the ones kept.
    let done: Vec<TaskRecord> = page
        .tasks
        .into_iter()
        .filter(|t| t.status.is_terminal())
        .collect();
    let mut steps_of: HashMap<String, Vec<HistoryStep>> = HashMap::new();
    if config.history_steps_bytes > 0 {
        let ids: Vec<String> = done.iter().map(|t| t.id.clone()).collect();
        for step in store.history_steps(&ids).await? {
            steps_of.entry(step.task_id.clone()).or_default().push(step);
        }
    }
    let mut room = config.history_steps_bytes;
    let mut earlier = Vec::with_capacity(done.len());
    for task in done {
        let mut steps = Vec::new();
        if let Some(journal) = steps_of.remove(&task.id) {
            let bytes: usize = journal.iter().map(HistoryStep::journal_bytes).sum();
            if bytes <= room {
                room -= bytes;
                steps = journal.iter().filter_map(&planner_view).collect();
            } else {
                room = 0;
            }
        }
        earlier.push(EarlierTask {
            goal: task.goal,
            // A failed task's result is an answer that was refused (it did
            // not match its response format): not an answer to build on.
            answer: task.result.filter(|_| task.status == TaskStatus::Succeeded),
            steps,
        });
    }
    earlier.reverse();
    Ok(earlier)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::{NewTask, SqliteStore, StepEnd, StepKind, StepStart, TaskEnd, conformance};

    /// What the test's planner sees of a step: its call, as the journal
    /// holds it.
    fn view(step: &HistoryStep) -> Option<PlannerStep> {
        Some(PlannerStep::LlmFailed {
            message: step.call.clone().unwrap_or_default(),
        })
    }

    fn in_thread(goal: &str, tenant: &str) -> NewTask {
        NewTask {
            tenant: tenant.into(),
            thread: Some("t".into()),
            ..conformance::new_task(goal, 0, None)
        }
    }

    /// Runs a new task of thread "t" to its end, with one step.
    async fn finished(store: &SqliteStore, goal: &str, tenant: &str) {
        store.create_task(in_thread(goal, tenant)).await.unwrap();
        let claim = store
            .claim_next("host", Duration::from_secs(30))
            .await
            .unwrap()
            .unwrap();
        let (started, _) = store
            .start_step(
                &claim.fence,
                StepStart {
                    seq: 1,
                    kind: StepKind::Tool,
                    plugin: "calculator".into(),
                    input: serde_json::json!({"of": goal}),
                    versions: Default::default(),
                },
            )
            .await
            .unwrap();
        store
            .finish_step(
                &claim.fence,
                StepEnd {
                    started,
                    output: Ok(serde_json::json!("done")),
                    usage: None,
                    cost_nanos: None,
                    charge: None,
                    finished_at: crate::store::now_millis(),
                },
            )
            .await
            .unwrap();
        store
            .finish_task(
                &claim.fence,
                TaskEnd::Succeeded {
                    result: format!("answer to {goal}"),
                },
            )
            .await
            .unwrap();
    }

    /// The newest earlier tasks are kept, oldest first; steps go from the
    /// oldest end when the byte budget is short; another tenant's thread of
    /// the same name is not history.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn history_keeps_the_newest_tasks_and_their_steps_first() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("opspawn.db").display());
        let store = SqliteStore::open(&url).await.unwrap();
        for goal in ["g0", "g1", "g2"] {
            finished(&store, goal, "default").await;
        }
        finished(&store, "elsewhere", "other").await;
        let (task, _) = store
            .create_task(in_thread("now", "default"))
            .await
            .unwrap();
        // What the journal holds of each task's one step: its call and its
        // output, as JSON text.
        let one_task_of_steps = r#"{"of":"g0"}"#.len() + r#""done""#.len();

        let seen = |history_tasks, history_steps_bytes| {
            let store = &store;
            let task = &task;
            async move {
                let config = ThreadsConfig {
                    history_tasks,
                    history_steps_bytes,
                };
                history(store, task, &config, view)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|t| (t.goal, t.answer, t.steps.len()))
                    .collect::<Vec<_>>()
            }
        };
        let answer = |goal: &str| Some(format!("answer to {goal}"));
        let config = ThreadsConfig::default();
        let history_of_all = history(&store, &task, &config, view).await.unwrap();
        assert_eq!(
            history_of_all[0].steps,
            [PlannerStep::LlmFailed {
                message: r#"{"of":"g0"}"#.into()
            }],
            "a step's journal text reaches the view"
        );
        assert_eq!(
            seen(20, 1 << 20).await,
            [
                ("g0".into(), answer("g0"), 1),
                ("g1".into(), answer("g1"), 1),
                ("g2".into(), answer("g2"), 1),
            ]
        );
        assert_eq!(
            seen(2, 1 << 20).await,
            [
                ("g1".into(), answer("g1"), 1),
                ("g2".into(), answer("g2"), 1)
            ],
            "the newest two"
        );
        assert_eq!(
            seen(20, one_task_of_steps * 2).await,
            [
                ("g0".into(), answer("g0"), 0),
                ("g1".into(), answer("g1"), 1),
                ("g2".into(), answer("g2"), 1),
            ],
            "the newest tasks' steps fit; the oldest's do not"
        );
        assert_eq!(
            seen(20, one_task_of_steps * 2 - 1).await,
            [
                ("g0".into(), answer("g0"), 0),
                ("g1".into(), answer("g1"), 0),
                ("g2".into(), answer("g2"), 1),
            ]
        );
        assert_eq!(
            seen(20, 0).await.iter().map(|t| t.2).sum::<usize>(),
            0,
            "goals and answers only"
        );
        assert!(seen(0, 1 << 20).await.is_empty());

        let (loose, _) = store
            .create_task(conformance::new_task("no thread", 0, None))
            .await
            .unwrap();
        assert!(
            history(&store, &loose, &config, view)
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn thread_ids_are_short_and_plain() {
        for good in ["a", "chat-1", "user_42:support.v2", &"x".repeat(128)] {
            assert_eq!(invalid_thread_id(good), None, "{good:?}");
        }
        for bad in ["", "a b", "a/b", "é", "a\u{0}", "a?b", &"x".repeat(129)] {
            assert!(invalid_thread_id(bad).is_some(), "{bad:?}");
        }
    }
}
