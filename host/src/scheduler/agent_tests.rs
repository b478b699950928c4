//! The agent loop (`agent.rs`) on its own, against a real SQLite store and
//! the real plugin runtime with the example components (calculator, react,
//! scripted): a task is created and claimed in the store, one run is
//! driven to its end, and the journal is read back. No dispatcher, no
//! lease renewer, no server.
//!
//! The runtime is a concrete type, not a trait: these tests use it as the
//! server does rather than a fake that could drift from it, and the
//! scripted adapter makes the LLM's answers exact.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use super::agent::Run;
use super::{SchedulerConfig, Shared};
use crate::errors::Code;
use crate::events::EventBus;
use crate::protocol::{
    ChatMessage, ChatResponse, FinishReason, PlannerStep, ProviderDatum, Role, ToolCall,
};
use crate::store::{
    Claim, NewTask, StepEnd, StepKind, StepRecord, StepStart, StepStatus, TaskRecord, TaskStatus,
    conformance,
};
use crate::test_support::TestHost;

const WORKER: &str = "host-under-test";

struct Loop {
    host: TestHost,
    shared: Arc<Shared>,
}

impl Loop {
    async fn start() -> Self {
        Self::start_with(SchedulerConfig::default()).await
    }

    async fn start_with(config: SchedulerConfig) -> Self {
        let host = TestHost::start(true).await;
        let shared = Arc::new(Shared {
            store: host.store.clone(),
            runtime: host.runtime.clone(),
            events: EventBus::default(),
            host_id: WORKER.to_owned(),
            wake: Notify::new(),
            shutdown: CancellationToken::new(),
            slots: Arc::new(Semaphore::new(config.max_running_tasks)),
            config,
            running: Mutex::new(HashMap::new()),
        });
        Self { host, shared }
    }

    /// Creates a task with a scripted LLM and claims it.
    async fn claim(&self, change: impl FnOnce(&mut NewTask)) -> Claim {
        let mut task = conformance::new_task("What is (2+3)*4?", 0, None);
        task.options = json!({"llm": {"script": [
            {"tool_calls": [{"name": "calculator", "arguments": {"expression": "(2+3)*4"}}]},
            {"content": "Thought: the calculator answered.\nFinal Answer: 20"}
        ]}});
        change(&mut task);
        self.host.store.create_task(task).await.unwrap();
        self.claim_again().await
    }

    async fn claim_again(&self) -> Claim {
        self.host
            .store
            .claim_next(WORKER, Duration::from_secs(30))
            .await
            .unwrap()
            .expect("a task to claim")
    }

    /// Runs the claim to its end (or interruption, per the tokens); the
    /// task and its journal as stored then.
    async fn run(
        &self,
        claim: Claim,
        cancel: CancellationToken,
        lost: CancellationToken,
    ) -> (TaskRecord, Vec<StepRecord>) {
        let id = claim.task.id.clone();
        let run = Run::new(self.shared.clone(), claim, cancel, lost);
        tokio::time::timeout(Duration::from_secs(30), run.run())
            .await
            .expect("the run ends within 30 s");
        let task = self.host.store.get_task(&id).await.unwrap().unwrap();
        let steps = self.host.store.steps(&id).await.unwrap();
        (task, steps)
    }

    async fn run_to_end(&self, claim: Claim) -> (TaskRecord, Vec<StepRecord>) {
        self.run(claim, CancellationToken::new(), CancellationToken::new())
            .await
    }
}

fn kinds(steps: &[StepRecord]) -> Vec<StepKind> {
    steps.iter().map(|s| s.kind).collect()
}

#[tokio::test]
async fn each_effect_is_a_journaled_step_and_the_answer_is_the_result() {
    let agent = Loop::start().await;
    let claim = agent.claim(|_| {}).await;
    let (task, steps) = agent.run_to_end(claim).await;
    assert_eq!(task.status, TaskStatus::Succeeded, "{task:?}");
    assert_eq!(task.result.as_deref(), Some("20"));
    assert_eq!(
        kinds(&steps),
        [StepKind::Llm, StepKind::Tool, StepKind::Llm]
    );
    assert!(steps.iter().all(|s| s.status == StepStatus::Succeeded));
    assert_eq!(steps[1].plugin, "calculator");
    assert_eq!(steps[1].output.as_ref().unwrap()["result"], 20);
    assert_eq!(
        steps.iter().map(|s| s.seq).collect::<Vec<_>>(),
        [1, 2, 3],
        "numbered in order"
    );
}

#[tokio::test]
async fn a_tool_outside_the_tasks_list_fails_its_step_and_the_planner_goes_on() {
    let agent = Loop::start().await;
    let claim = agent
        .claim(|task| {
            task.options = json!({"llm": {"script": [
                {"tool_calls": [{"name": "shell", "arguments": {"command": "rm -rf /"}}]},
                {"content": "Final Answer: could not"}
            ]}});
        })
        .await;
    let (task, steps) = agent.run_to_end(claim).await;
    assert_eq!(task.status, TaskStatus::Succeeded, "{task:?}");
    assert_eq!(steps[1].status, StepStatus::Failed);
    let error = steps[1].error.as_ref().expect("the step's error");
    assert_eq!(error.code, Code::ToolNotAllowed.as_str(), "{error:?}");
    assert!(error.message.contains("calculator"), "{error:?}");
}

#[tokio::test]
async fn the_step_limit_ends_the_task_with_its_code() {
    let agent = Loop::start().await;
    let claim = agent.claim(|task| task.max_steps = 2).await;
    let (task, steps) = agent.run_to_end(claim).await;
    assert_eq!(task.status, TaskStatus::Failed);
    let error = task.error.expect("the task's error");
    assert_eq!(error.code, Code::StepLimitExceeded.as_str(), "{error:?}");
    assert_eq!(steps.len(), 2);
}

#[tokio::test]
async fn a_planner_that_gives_up_fails_the_task_with_its_reason() {
    let agent = Loop::start().await;
    let claim = agent
        .claim(|task| task.options = json!({"llm": {"script": [{"content": ""}]}}))
        .await;
    let (task, _) = agent.run_to_end(claim).await;
    assert_eq!(task.status, TaskStatus::Failed);
    let error = task.error.expect("the task's error");
    assert_eq!(error.code, Code::PlannerGaveUp.as_str(), "{error:?}");
    assert!(error.message.contains("empty"), "{error:?}");
}

/// After a crash the next claim hands the planner the finished steps as
/// they were journaled and never performs them again.
#[tokio::test]
async fn a_finished_step_in_the_journal_is_not_performed_again() {
    let agent = Loop::start().await;
    let first = agent.claim(|_| {}).await;
    // The dead claim's LLM step: a reply the script would never give, with
    // opaque provider data that must reach the planner unchanged.
    let reply = ChatResponse {
        message: ChatMessage {
            role: Role::Assistant,
            content: String::new(),
            images: Vec::new(),
            tool_calls: vec![ToolCall {
                id: "call-1".into(),
                name: "calculator".into(),
                arguments: json!({"expression": "6*7"}),
            }],
            tool_call_id: None,
            provider_data: vec![
                ProviderDatum {
                    key: "gemini:thought_signature:call-1".into(),
                    value: "CiQBcsjaf/+Mock==".into(),
                },
                ProviderDatum {
                    key: "anthropic:thinking:0".into(),
                    value: "Think — “6×7”,\nthen \"answer\".".into(),
                },
            ],
        },
        finish_reason: FinishReason::ToolCalls,
        usage: None,
        model: "journaled".into(),
    };
    let (started, _) = agent
        .host
        .store
        .start_step(
            &first.fence,
            StepStart {
                seq: 1,
                kind: StepKind::Llm,
                plugin: "scripted".into(),
                input: json!({"messages": []}),
                versions: Default::default(),
            },
        )
        .await
        .unwrap();
    agent
        .host
        .store
        .finish_step(
            &first.fence,
            StepEnd {
                started,
                output: Ok(json!(&reply)),
                usage: None,
                cost_nanos: None,
                charge: None,
                finished_at: crate::store::now_millis(),
            },
        )
        .await
        .unwrap();
    // The host died; its lease is gone.
    assert_eq!(agent.host.store.expire_all_leases().await.unwrap(), 1);
    let second = agent.claim_again().await;
    assert_eq!(second.steps.len(), 1, "the claim carries the journal");
    assert_eq!(
        super::agent::planner_view(&second.steps[0]),
        Some(PlannerStep::LlmReply {
            response: reply.clone()
        }),
        "the journaled reply reaches the planner whole, provider data included"
    );

    let (task, steps) = agent.run_to_end(second).await;
    assert_eq!(task.status, TaskStatus::Succeeded, "{task:?}");
    assert_eq!(steps.len(), 3, "{steps:#?}");
    assert_eq!(steps[0].output.as_ref().unwrap()["model"], "journaled");
    assert_eq!(
        steps[0].attempt, first.fence.attempt,
        "step 1 was not redone"
    );
    assert_eq!(steps[1].input["arguments"]["expression"], "6*7");
    assert_eq!(steps[1].output.as_ref().unwrap()["result"], 42);
}

#[tokio::test]
async fn a_cancelled_run_ends_cancelled_before_its_next_step() {
    let agent = Loop::start().await;
    let claim = agent.claim(|_| {}).await;
    let cancel = CancellationToken::new();
    cancel.cancel();
    let (task, steps) = agent.run(claim, cancel, CancellationToken::new()).await;
    assert_eq!(task.status, TaskStatus::Cancelled);
    assert!(steps.is_empty(), "{steps:#?}");
}

#[tokio::test]
async fn a_run_whose_claim_is_lost_writes_nothing_more() {
    let agent = Loop::start().await;
    let claim = agent.claim(|_| {}).await;
    let lost = CancellationToken::new();
    lost.cancel();
    let (task, steps) = agent.run(claim, CancellationToken::new(), lost).await;
    assert_eq!(task.status, TaskStatus::Running, "left to the new owner");
    assert!(steps.is_empty(), "{steps:#?}");
}

/// The calculator task's script, each reply reporting `usage` tokens.
fn calculator_script(input: u64, output: u64) -> serde_json::Value {
    let usage = json!({"input_tokens": input, "output_tokens": output});
    json!({"llm": {"script": [
        {"tool_calls": [{"name": "calculator", "arguments": {"expression": "(2+3)*4"}}],
         "usage": usage},
        {"content": "Thought: the calculator answered.\nFinal Answer: 20", "usage": usage}
    ]}})
}

/// The worst case the host estimated for each LLM step, from its journaled
/// request.
fn estimates(budgets: &crate::budgets::Budgets, steps: &[StepRecord]) -> Vec<u64> {
    steps
        .iter()
        .filter(|s| s.kind == StepKind::Llm)
        .map(|s| {
            let request: crate::protocol::ChatRequest =
                serde_json::from_value(s.input.clone()).unwrap();
            budgets.estimate("scripted", &request).tokens()
        })
        .collect()
}

fn with_budgets(toml_text: &str) -> SchedulerConfig {
    let config: crate::budgets::BudgetsConfig = toml::from_str(toml_text).unwrap();
    SchedulerConfig {
        budgets: Arc::new(
            crate::budgets::Budgets::new(&crate::budgets::default_prices(), &config).unwrap(),
        ),
        ..SchedulerConfig::default()
    }
}

#[tokio::test]
async fn a_call_that_could_pass_the_tasks_token_cap_is_not_made() {
    let agent = Loop::start_with(with_budgets("default_max_output_tokens = 100")).await;
    let budgets = agent.shared.config.budgets.clone();
    // A generous cap first, to see what each call is estimated at.
    let claim = agent
        .claim(|task| {
            task.options = calculator_script(10, 5);
            task.budget.max_tokens = Some(1_000_000);
        })
        .await;
    let (task, steps) = agent.run_to_end(claim).await;
    assert_eq!(task.status, TaskStatus::Succeeded, "{task:?}");
    assert_eq!(
        steps[0].input["max_tokens"], 100,
        "a call under a budget that sets no bound is given the configured one"
    );
    assert_eq!(task.cost_nanos, Some(0), "the scripted adapter is free");
    let [first, second] = estimates(&budgets, &steps)[..] else {
        panic!("two LLM steps: {steps:?}")
    };
    assert!(
        second > first,
        "the second request carries more: {first} {second}"
    );

    // The first call fits; the second, on top of the first's 15 tokens,
    // would pass the cap by one.
    let cap = 15 + second - 1;
    let claim = agent
        .claim(|task| {
            task.options = calculator_script(10, 5);
            task.budget.max_tokens = Some(cap);
        })
        .await;
    let (task, steps) = agent.run_to_end(claim).await;
    assert_eq!(task.status, TaskStatus::Failed);
    let error = task.error.unwrap();
    assert_eq!(error.code, Code::BudgetExceeded.as_str(), "{error:?}");
    assert!(
        error
            .message
            .contains(&format!("could use up to {second} tokens"))
            && error
                .message
                .contains(&format!("{} of its {cap} tokens left (15 used)", cap - 15))
            && error.message.contains("budget.max_tokens"),
        "the message says which cap, what is used and left, and how to raise it: {}",
        error.message
    );
    assert_eq!(
        kinds(&steps),
        [StepKind::Llm, StepKind::Tool, StepKind::Llm]
    );
    let refused = &steps[2];
    assert_eq!(refused.status, StepStatus::Failed);
    assert_eq!(
        (refused.output.as_ref(), refused.usage),
        (None, None),
        "the refused call was never made: no reply, no usage"
    );
    assert_eq!(
        (task.usage.input_tokens, task.usage.output_tokens),
        (10, 5),
        "only the call made is counted"
    );
}

#[tokio::test]
async fn a_tenants_period_cap_stops_its_next_task_and_counts_what_both_used() {
    let budgets_with_cap = |cap: u64| {
        with_budgets(&format!(
            r#"
            default_max_output_tokens = 100
            [tenants.default]
            period = "day"
            max_tokens = {cap}
            "#
        ))
    };
    // A cap of 1 refuses the first call outright, and nothing is counted.
    let agent = Loop::start_with(budgets_with_cap(1)).await;
    let claim = agent
        .claim(|task| task.options = calculator_script(10, 5))
        .await;
    let (task, steps) = agent.run_to_end(claim).await;
    assert_eq!(task.error.unwrap().code, Code::BudgetExceeded.as_str());
    assert_eq!(steps.len(), 1);
    let period = crate::budgets::Period::Day.at(crate::store::now_millis());
    let counted = agent.host.store.period_usage("default", &period.key).await;
    assert_eq!(counted.unwrap().tokens(), 0);
    drop(agent);

    // What each call of the task is estimated at, under a cap it fits.
    let agent = Loop::start_with(budgets_with_cap(1_000_000)).await;
    let claim = agent
        .claim(|task| task.options = calculator_script(10, 5))
        .await;
    let (task, steps) = agent.run_to_end(claim).await;
    assert_eq!(task.status, TaskStatus::Succeeded, "{task:?}");
    let second = estimates(&agent.shared.config.budgets, &steps)[1];
    drop(agent);

    // Room for one task (its second call comes on top of its first's 15
    // tokens), but not for the second call of the next.
    let cap = 15 + second + 10;
    let agent = Loop::start_with(budgets_with_cap(cap)).await;
    let mut used = 0;
    let mut outcomes = Vec::new();
    for _ in 0..2 {
        let claim = agent
            .claim(|task| task.options = calculator_script(10, 5))
            .await;
        let (task, _) = agent.run_to_end(claim).await;
        used += task.usage.input_tokens + task.usage.output_tokens;
        outcomes.push(task.error);
    }
    assert_eq!(outcomes[0], None, "the first task fits: {outcomes:?}");
    let stopped = outcomes[1].as_ref().expect("the second task is stopped");
    assert_eq!(stopped.code, Code::BudgetExceeded.as_str());
    assert!(
        stopped.message.contains("tenant \"default\"'s day budget")
            && stopped.message.contains("(45 used, 0 held")
            && stopped.message.contains("[budgets.tenants.default]"),
        "{}",
        stopped.message
    );
    let counted = agent
        .host
        .store
        .period_usage("default", &period.key)
        .await
        .unwrap();
    assert_eq!(
        used, 45,
        "the first task's two calls and the second's first"
    );
    assert_eq!(
        counted.tokens(),
        used,
        "the period holds what the tasks used"
    );
    assert_eq!(
        agent.shared.config.budgets.reserved("default", &period.key),
        (0, 0),
        "every hold is released once its usage is journaled"
    );
}

/// What a task waiting on its LLM costs the host is mostly the memory of
/// its run's future: the largest state among its awaits, held for the
/// whole wait. With thousands of tasks waiting, each kilobyte here is
/// megabytes.
#[tokio::test]
async fn a_running_tasks_future_stays_small() {
    let agent = Loop::start().await;
    let claim = agent.claim(|_| {}).await;
    let run = Run::new(
        agent.shared.clone(),
        claim,
        CancellationToken::new(),
        CancellationToken::new(),
    );
    let future = run.run();
    let bytes = std::mem::size_of_val(&future);
    eprintln!("a run's future: {bytes} bytes");
    // 16.7 KB when this was written.
    assert!(bytes <= 32 << 10, "a run's future holds {bytes} bytes");
}

/// A task's response format goes with each LLM call the planner leaves
/// without one, and its answer must match the schema: one that does not
/// fails the task with `answer_schema_mismatch`, the answer kept.
#[tokio::test]
async fn a_response_format_reaches_the_llm_and_the_answer_is_checked() {
    let format = crate::protocol::ResponseFormat {
        name: "calc".into(),
        schema: json!({
            "type": "object",
            "properties": {"answer": {"type": "integer"}},
            "required": ["answer"],
        }),
        strict: false,
    };
    let agent = Loop::start().await;
    for (answer, matches) in [(r#"{"answer": 20}"#, true), (r#"{"answer": "20"}"#, false)] {
        let claim = agent
            .claim(|task| {
                task.response_format = Some(format.clone());
                task.options = json!({"llm": {"script": [
                    {"tool_calls": [{"name": "calculator", "arguments": {"expression": "(2+3)*4"}}]},
                    {"content": answer}
                ]}});
            })
            .await;
        let (task, steps) = agent.run_to_end(claim).await;
        for llm in steps.iter().filter(|s| s.kind == StepKind::Llm) {
            assert_eq!(
                llm.input["response_format"],
                json!({"name": "calc", "schema": format.schema, "strict": false}),
                "each LLM call carries the task's format: {llm:?}"
            );
        }
        assert_eq!(
            task.result.as_deref(),
            Some(answer),
            "the answer is kept either way"
        );
        if matches {
            assert_eq!(task.status, TaskStatus::Succeeded, "{task:?}");
            assert_eq!(task.error, None);
        } else {
            assert_eq!(task.status, TaskStatus::Failed, "{task:?}");
            let error = task.error.expect("the task's error");
            assert_eq!(error.code, Code::AnswerSchemaMismatch.as_str(), "{error:?}");
            assert!(
                error.message.contains("at /answer: ")
                    && error.message.contains("is not of type \"integer\""),
                "{error:?}"
            );
        }
    }
}
