//! Schedules end to end, on a real server: a schedule ticking every second
//! creates one task per tick, each running to its end; pause, resume and
//! delete take effect at once; ticks missed while the server was down
//! follow the schedule's policy; the CLI drives all of it. (Three hosts on
//! one Postgres database: `scaleout::a_schedule_runs_once_per_tick_on_three_hosts`.)

use std::time::{Duration, Instant};

use opspawn_testkit::{Client, StatusCode};
use serde_json::{Value, json};

use crate::{FINISH, Harness, binary, calculator_task};

/// Creates a schedule; panics unless the server answers 201.
pub async fn create_schedule(client: &Client, body: &Value) -> String {
    let (status, schedule) = client.post("/v1/schedules", body).await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{schedule}");
    schedule["id"].as_str().unwrap().to_owned()
}

/// The schedule's runs, oldest tick first: (tick in ms, task).
pub async fn runs(client: &Client, schedule: &str) -> Vec<(i64, Value)> {
    let (status, page) = client
        .get(&format!("/v1/tasks?schedule={schedule}&limit=500"))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{page}");
    let mut runs: Vec<(i64, Value)> = page["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|task| {
            assert_eq!(task["schedule_id"], schedule, "{task}");
            let tick = task["scheduled_for"]
                .as_str()
                .expect("a run names its tick");
            (millis(tick), task.clone())
        })
        .collect();
    runs.sort_by_key(|(tick, _)| *tick);
    runs
}

pub fn millis(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .unwrap_or_else(|e| panic!("{rfc3339}: {e}"))
        .timestamp_millis()
}

fn now_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Ticks one second apart, none twice, no gap.
pub fn assert_consecutive(ticks: &[i64], what: &str) {
    for pair in ticks.windows(2) {
        assert_eq!(pair[1] - pair[0], 1000, "{what}: {ticks:?}");
    }
}

async fn post_empty(client: &Client, path: &str) -> (StatusCode, Value) {
    let response = client.http().post(client.url(path)).send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_creates_one_task_per_tick_and_pause_resume_and_delete_take_effect() {
    let harness = Harness::start();
    let client = harness.client();
    let id = create_schedule(
        &client,
        &json!({
            "name": "every second",
            "cron": "* * * * * *",
            "task": calculator_task("6*7", "42"),
        }),
    )
    .await;

    tokio::time::sleep(Duration::from_millis(3500)).await;
    let (_, paused) = post_empty(&client, &format!("/v1/schedules/{id}/pause")).await;
    assert_eq!(paused["paused"], true, "{paused}");
    let before_pause = runs(&client, &id).await;
    assert!(
        (2..=5).contains(&before_pause.len()),
        "about one run a second: {:?}",
        before_pause.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    let ticks: Vec<i64> = before_pause.iter().map(|r| r.0).collect();
    assert_consecutive(&ticks, "while running");
    for (tick, task) in &before_pause {
        assert_eq!(tick % 1000, 0, "a tick is a whole second");
        let created = millis(task["created_at"].as_str().unwrap());
        assert!(created >= *tick, "a run is not created before its tick");
        let id = task["id"].as_str().unwrap();
        let done = client.wait_until_finished(id, FINISH).await.unwrap();
        assert_eq!(done["status"], "succeeded", "{done}");
        assert_eq!(done["result"], "42");
    }
    // The run's first event names the schedule.
    let first = before_pause[0].1["id"].as_str().unwrap();
    let events = client.events(first, None, FINISH).await.unwrap();
    assert_eq!(events[0].event, "task.queued");
    assert_eq!(events[0].data["data"]["schedule_id"], id.as_str());

    // Paused: nothing more, however many ticks pass.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        runs(&client, &id).await.len(),
        before_pause.len(),
        "no run while paused"
    );

    // Resumed: runs again, from the next tick to come, with no catch-up.
    let resumed_at = now_millis();
    let (_, resumed) = post_empty(&client, &format!("/v1/schedules/{id}/resume")).await;
    assert_eq!(resumed["paused"], false, "{resumed}");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let after_resume = runs(&client, &id).await;
    let new: Vec<i64> = after_resume
        .iter()
        .map(|r| r.0)
        .filter(|tick| !ticks.contains(tick))
        .collect();
    assert!(!new.is_empty(), "runs again after resume");
    assert!(
        new.iter().all(|tick| *tick > resumed_at),
        "no run for the ticks while paused: {new:?}, resumed at {resumed_at}"
    );

    // Deleted: no more runs; those it made stay.
    let deleted = client
        .http()
        .delete(client.url(&format!("/v1/schedules/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    let at_delete = runs(&client, &id).await.len();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(
        runs(&client, &id).await.len(),
        at_delete,
        "no run once deleted"
    );
    let (status, _) = client.get(&format!("/v1/schedules/{id}")).await.unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// Two schedules ticking every second, one `skip` and one `run_once`; the
/// server is killed for five seconds. After the restart `skip` has no run
/// for any tick while it was down, and `run_once` exactly one (for the last
/// missed tick); both then go on together, one run per tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticks_missed_while_the_server_was_down_are_skipped_or_run_once() {
    let mut harness = Harness::start_with(&[("OPSPAWN_SCHEDULES__MISFIRE_GRACE", "2s")]);
    let client = harness.client();
    let task = json!({"goal": "tick", "tools": [], "options": {"llm": {"script": [
        {"content": "Final Answer: tock"}
    ]}}});
    let skip = create_schedule(
        &client,
        &json!({"cron": "* * * * * *", "missed_ticks": "skip", "task": task}),
    )
    .await;
    let once = create_schedule(
        &client,
        &json!({"cron": "* * * * * *", "missed_ticks": "run_once", "task": task}),
    )
    .await;
    let deadline = Instant::now() + FINISH;
    while runs(&client, &skip).await.len() < 2 || runs(&client, &once).await.len() < 2 {
        assert!(Instant::now() < deadline, "the schedules never ran");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    harness.server.kill9();
    let killed_at = now_millis();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let restarting_at = now_millis();
    harness.server.restart().unwrap();
    let client = harness.client();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for id in [&skip, &once] {
        post_empty(&client, &format!("/v1/schedules/{id}/pause")).await;
    }

    let ticks = |runs: Vec<(i64, Value)>| runs.into_iter().map(|r| r.0).collect::<Vec<_>>();
    let skipped = ticks(runs(&client, &skip).await);
    let run_once = ticks(runs(&client, &once).await);
    let after =
        |ticks: &[i64]| -> Vec<i64> { ticks.iter().copied().filter(|t| *t > killed_at).collect() };
    let (skipped_after, once_after) = (after(&skipped), after(&run_once));
    assert!(
        !skipped_after.is_empty() && once_after.len() >= 2,
        "both run again after the restart: {skipped_after:?} {once_after:?}"
    );
    assert!(
        skipped_after[0] >= restarting_at,
        "skip: no run for a tick while the server was down (down from {killed_at} to \
         {restarting_at}): {skipped:?}"
    );
    assert_eq!(
        once_after[0] + 1000,
        once_after[1],
        "run_once: one run for the missed ticks, then the next tick: {run_once:?}"
    );
    assert!(
        once_after[0] > killed_at + 2000,
        "run_once's one run is for the latest missed tick: {run_once:?}"
    );
    assert_eq!(
        once_after[1], skipped_after[0],
        "after the missed ticks both continue at the same tick: skip {skipped:?}, run_once \
         {run_once:?}"
    );
    let last = *skipped_after
        .last()
        .unwrap()
        .min(once_after.last().unwrap());
    let common = |ticks: &[i64]| -> Vec<i64> {
        ticks
            .iter()
            .copied()
            .filter(|t| *t >= skipped_after[0] && *t <= last)
            .collect()
    };
    assert_eq!(common(&once_after), common(&skipped_after));
    assert_consecutive(&common(&skipped_after), "after the restart");
    // Before the kill, each ran every tick.
    for (what, ticks) in [("skip", &skipped), ("run_once", &run_once)] {
        let before: Vec<i64> = ticks.iter().copied().filter(|t| *t <= killed_at).collect();
        assert_consecutive(&before, what);
    }
}

/// `opspawn schedules create|list|show|pause|resume|delete` against a real
/// server, as a user would type them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_creates_lists_shows_pauses_resumes_and_deletes_schedules() {
    let harness = Harness::start();
    let server = harness.server.base_url.clone();
    let opspawn = |args: &[&str]| {
        let output = std::process::Command::new(binary())
            .args(args)
            .args(["--server", &server])
            .output()
            .expect("running opspawn");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        (output.status.success(), stdout, stderr)
    };
    let (ok, created, stderr) = opspawn(&[
        "schedules",
        "create",
        "--cron",
        "0 9 * * MON-FRI",
        "--timezone",
        "Europe/Berlin",
        "--name",
        "weekday report",
        "--missed-ticks",
        "run_once",
        "--tool",
        "calculator",
        "Summarise yesterday",
    ]);
    assert!(ok, "{stderr}");
    let id = created.split_whitespace().next().unwrap().to_owned();
    assert!(created.contains("Europe/Berlin (run_once)"), "{created}");
    assert!(created.contains("weekday report"), "{created}");

    let (ok, listed, stderr) = opspawn(&["schedules", "list"]);
    assert!(ok, "{stderr}");
    assert!(listed.contains(&id) && listed.contains("next "), "{listed}");

    let (ok, shown, stderr) = opspawn(&["schedules", "show", &id]);
    assert!(ok, "{stderr}");
    let shown: Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["task"]["goal"], "Summarise yesterday");
    assert_eq!(shown["task"]["tools"], json!(["calculator"]));
    assert_eq!(shown["next_runs"].as_array().unwrap().len(), 3);

    let (ok, paused, stderr) = opspawn(&["schedules", "pause", &id]);
    assert!(ok && paused.contains("paused"), "{paused}{stderr}");
    let (ok, resumed, stderr) = opspawn(&["schedules", "resume", &id]);
    assert!(ok && resumed.contains("next "), "{resumed}{stderr}");

    let (ok, refused, stderr) = opspawn(&["schedules", "create", "--cron", "* * *", "anything"]);
    assert!(!ok, "{refused}");
    assert!(stderr.contains("invalid_schedule"), "{stderr}");

    let (ok, deleted, stderr) = opspawn(&["schedules", "delete", &id]);
    assert!(ok && deleted.contains("deleted"), "{deleted}{stderr}");
    let (ok, _, stderr) = opspawn(&["schedules", "show", &id]);
    assert!(!ok && stderr.contains("schedule_not_found"), "{stderr}");
}
