//! Budgets end to end: a real server runs the OpenAI adapter against the
//! loopback mock of OpenAI's API, with prices and caps from a configuration
//! file. A call that could pass a cap is never sent: the mock's request
//! count proves it. The tenant's period figures at `GET /v1/usage` are the
//! sum of its tasks'.

use opspawn::budgets::{Budgets, BudgetsConfig, Estimate, PriceTable};
use opspawn::protocol::{ChatRequest, Usage};
use opspawn_testkit::providers::models;
use opspawn_testkit::{Client, MockProviders, Provider};
use serde_json::{Value, json};

use crate::{FINISH, Harness, steps};

const PROVIDER: Provider = Provider::OpenAi;

/// Prices for the adapter under test, and the output bound a call that
/// sets none is given.
const PRICES: &str = r#"
[prices.openai."*"]
input_per_million = 2.5
output_per_million = 10

[budgets]
default_max_output_tokens = 200
"#;

/// A server with the OpenAI adapter pointed at `mock`, configured with
/// `PRICES` and then `extra`.
fn start(mock: &MockProviders, extra: &str) -> (Harness, tempfile::NamedTempFile) {
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), format!("{PRICES}\n{extra}")).unwrap();
    let path = config.path().to_str().unwrap().to_owned();
    let harness = Harness::start_with_plugins(
        &[
            (PROVIDER.base_url_var(), &mock.base_url_for(PROVIDER)),
            (PROVIDER.key_var(), &PROVIDER.test_key()),
            ("OPSPAWN_CONFIG", &path),
        ],
        |plugins| {
            plugins.add(
                PROVIDER.plugin(),
                PROVIDER.wasm(),
                Some(&PROVIDER.manifest()),
            );
        },
    );
    (harness, config)
}

/// The prices and caps as the server reads them, to check its figures.
fn budgets(extra: &str) -> Budgets {
    #[derive(serde::Deserialize)]
    struct File {
        prices: PriceTable,
        budgets: BudgetsConfig,
    }
    let file: File = toml::from_str(&format!("{PRICES}\n{extra}")).unwrap();
    Budgets::new(&file.prices, &file.budgets).unwrap()
}

/// The mock's ReAct task (the model calls the calculator, then answers).
fn react_task(budget: Option<Value>) -> Value {
    let mut task = json!({
        "goal": "What is 6 times 7?",
        "tools": ["calculator"],
        "llm": PROVIDER.plugin(),
        "model": models::REACT,
    });
    if let Some(budget) = budget {
        task["budget"] = budget;
    }
    task
}

async fn run(client: &Client, task: &Value) -> Value {
    let id = client.submit(task).await.unwrap();
    client.wait_until_finished(&id, FINISH).await.unwrap()
}

/// The worst case the host estimated for each LLM step, from its
/// journaled request.
fn estimates(budgets: &Budgets, task: &Value) -> Vec<Estimate> {
    steps(task)
        .iter()
        .filter(|step| step["kind"] == "llm")
        .map(|step| {
            let request: ChatRequest = serde_json::from_value(step["input"].clone()).unwrap();
            budgets.estimate(PROVIDER.plugin(), &request)
        })
        .collect()
}

fn usage(value: &Value) -> Usage {
    serde_json::from_value(value.clone()).unwrap()
}

fn tokens(value: &Value) -> u64 {
    let usage = usage(value);
    usage.input_tokens + usage.output_tokens
}

/// What a task cost, in nano-dollars, step by step at the configured prices.
fn cost_of(budgets: &Budgets, task: &Value) -> i64 {
    steps(task)
        .iter()
        .filter(|step| !step["usage"].is_null())
        .map(|step| {
            budgets
                .cost(
                    PROVIDER.plugin(),
                    Some(models::REACT),
                    &usage(&step["usage"]),
                )
                .unwrap()
        })
        .sum()
}

fn nanos(usd: &Value) -> i64 {
    (usd.as_f64()
        .unwrap_or_else(|| panic!("a cost in dollars, not {usd}"))
        * 1e9)
        .round() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_budget_stops_the_call_that_would_pass_it_before_it_is_sent() {
    let mock = MockProviders::start().await;
    let (harness, _config) = start(&mock, "");
    let client = harness.client();
    let budgets = budgets("");

    // A cap it fits in: each call is estimated, sent, and its cost counted.
    let task = run(&client, &react_task(Some(json!({"max_tokens": 1_000_000})))).await;
    assert_eq!(task["status"], "succeeded", "{task:#}");
    assert_eq!(mock.requests_for(PROVIDER).len(), 2);
    let llm_steps: Vec<&Value> = steps(&task).iter().filter(|s| s["kind"] == "llm").collect();
    assert_eq!(
        llm_steps[0]["input"]["max_tokens"], 200,
        "a call under a budget that sets no bound is sent the configured one"
    );
    let [first, second] = estimates(&budgets, &task)[..] else {
        panic!("two LLM steps: {task:#}")
    };
    let used_by_first = tokens(&llm_steps[0]["usage"]);
    assert_eq!(
        nanos(&task["cost_usd"]),
        cost_of(&budgets, &task),
        "the task's cost is its steps' usage at the configured price: {task:#}"
    );
    assert!(nanos(&task["cost_usd"]) > 0);
    let remaining = task["budget"]["remaining_tokens"].as_u64().unwrap();
    assert_eq!(remaining, 1_000_000 - tokens(&task["usage"]));

    // A cap the first call fits in and the second, on top of the first's
    // usage, would pass.
    let cap = used_by_first + second.tokens() - 1;
    assert!(first.tokens() <= cap, "{first:?} fits in {cap}");
    let task = run(&client, &react_task(Some(json!({"max_tokens": cap})))).await;
    assert_eq!(task["status"], "failed", "{task:#}");
    assert_eq!(task["error"]["code"], "budget_exceeded", "{task:#}");
    let message = task["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("the task's budget")
            && message.contains(&format!("of its {cap} tokens left ({used_by_first} used)"))
            && message.contains("budget.max_tokens"),
        "the message names the cap, the usage and how to raise it: {message}"
    );
    assert_eq!(
        mock.requests_for(PROVIDER).len(),
        3,
        "the second call of the capped task never reached the provider"
    );
    let journal = steps(&task);
    let kinds: Vec<&str> = journal
        .iter()
        .map(|s| s["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["llm", "tool", "llm"]);
    let refused = &journal[2];
    assert_eq!(refused["status"], "failed");
    assert_eq!(refused["error"]["code"], "budget_exceeded");
    assert_eq!(refused["output"], Value::Null);
    assert!(
        refused.get("usage").is_none_or(Value::is_null),
        "{refused:#}"
    );
    assert!(
        used_by_first + estimates(&budgets, &task)[1].tokens() > cap,
        "the refused request, as journaled, would have passed the cap"
    );
    assert_eq!(
        task["budget"]["remaining_tokens"],
        cap - used_by_first,
        "{task:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_period_cap_stops_its_next_task_and_usage_is_the_sum_of_its_tasks() {
    // First, what the task costs and what its calls are estimated at.
    let measure = MockProviders::start().await;
    let (harness, _config) = start(&measure, "");
    let budgets = budgets("");
    let task = run(&harness.client(), &react_task(None)).await;
    assert_eq!(task["status"], "succeeded", "{task:#}");
    let task_cost = cost_of(&budgets, &task);
    let second_call = estimates(&budgets, &task)[1];
    drop(harness);

    // A tenant cap per month in dollars with room for one task, its second
    // call's worst case included: not for the second call of a second task.
    let cap_nanos = task_cost + second_call.cost_nanos.unwrap() + 1;
    let cap = format!(
        r#"
        [budgets.default]
        period = "month"
        max_cost_usd = {}
        "#,
        cap_nanos as f64 / 1e9
    );
    let mock = MockProviders::start().await;
    let (harness, _config) = start(&mock, &cap);
    let client = harness.client();
    let (_, before) = client.get("/v1/usage").await.unwrap();
    assert_eq!(
        (&before["tracked"], &before["period"], &before["tokens"]),
        (&json!(true), &json!("month"), &json!(0)),
        "{before:#}"
    );
    assert_eq!(nanos(&before["max_cost_usd"]), cap_nanos);

    let first = run(&client, &react_task(None)).await;
    assert_eq!(first["status"], "succeeded", "{first:#}");
    let second = run(&client, &react_task(None)).await;
    assert_eq!(second["status"], "failed", "{second:#}");
    assert_eq!(second["error"]["code"], "budget_exceeded", "{second:#}");
    let message = second["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("tenant \"default\"'s month budget")
            && message.contains("[budgets.tenants.default]"),
        "{message}"
    );
    assert_eq!(
        mock.requests_for(PROVIDER).len(),
        3,
        "the first task's two calls and the second's first; its second was not sent"
    );

    let (status, period) = client.get("/v1/usage").await.unwrap();
    assert_eq!(status.as_u16(), 200, "{period}");
    let tasks_tokens = tokens(&first["usage"]) + tokens(&second["usage"]);
    assert_eq!(period["tokens"], tasks_tokens, "{period:#}");
    assert_eq!(
        period["input_tokens"],
        usage(&first["usage"]).input_tokens + usage(&second["usage"]).input_tokens
    );
    let tasks_cost = nanos(&first["cost_usd"]) + nanos(&second["cost_usd"]);
    assert_eq!(nanos(&period["cost_usd"]), tasks_cost, "{period:#}");
    assert_eq!(
        nanos(&period["remaining_cost_usd"]),
        cap_nanos - tasks_cost,
        "{period:#}"
    );
    assert_eq!(
        period["reserved_tokens"], 0,
        "nothing is held once tasks end"
    );
}
