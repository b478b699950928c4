//! The web dashboard (`/ui`) in a real browser: Debian's Chromium, driven
//! by Playwright for Python (tests/fixtures/ui/dashboard.py), against a real
//! server with the example plugins. Both are installed by `.ci/run` and
//! `scripts/common.sh`'s `ensure_ui_test_deps`; without them these tests
//! fail, saying so, rather than pass unchecked.

use std::path::{Path, PathBuf};
use std::process::Command;

use opspawn::api::auth::token_hash;
use opspawn_testkit::{MockProviders, Provider};

use crate::Harness;

/// Where Debian's `chromium` package puts the browser; `OPSPAWN_CHROMIUM`
/// points elsewhere.
const CHROMIUM: &str = "/usr/bin/chromium";

/// The cargo target folder the test binary was built in.
fn target_dir() -> PathBuf {
    // <target>/<profile>/deps/<test binary>
    let exe = std::env::current_exe().expect("the test binary's path");
    exe.ancestors()
        .nth(3)
        .expect("the test binary lives in <target>/<profile>/deps")
        .to_owned()
}

/// The Python of the virtualenv holding Playwright, and the browser.
fn browser_tools() -> (PathBuf, PathBuf) {
    let python = target_dir().join("ui-tests/venv/bin/python");
    let chromium = PathBuf::from(std::env::var("OPSPAWN_CHROMIUM").unwrap_or(CHROMIUM.into()));
    for (path, what) in [
        (&python, "Playwright's virtualenv"),
        (&chromium, "Chromium"),
    ] {
        assert!(
            path.exists(),
            "{} is missing: {what} is not installed. Run .ci/run, or `apt-get install chromium \
             chromium-driver` and `source scripts/common.sh && ensure_ui_test_deps` with the \
             same CARGO_TARGET_DIR",
            path.display()
        );
    }
    (python, chromium)
}

/// Runs a scenario of the browser script against `base_url`; its output is
/// shown whatever happens, and a failure fails the test.
fn run_scenario(scenario: &str, base_url: &str, env: &[(&str, &str)]) {
    let (python, chromium) = browser_tools();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/ui/dashboard.py");
    let screenshots = target_dir().join("ui-screenshots");
    let output = Command::new(python)
        .arg(script)
        .args(["--base-url", base_url, "--scenario", scenario])
        .arg("--chromium")
        .arg(chromium)
        .arg("--screenshots")
        .arg(&screenshots)
        .envs(env.iter().copied())
        .output()
        .expect("running the browser script");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "the dashboard's {scenario} scenario failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
}

/// Submit from the form and watch three steps arrive live; open a finished
/// task; filter the list; cancel a running task; a huge output; an unknown
/// task; a failed plugin load; the overview; keyboard navigation; and
/// screenshots at 1280×800 and 390×844, light and dark.
///
/// The scripted adapter is given a price and the tenant a monthly budget,
/// so each task's cost and the period's spending show in money.
#[test]
fn the_dashboard_follows_filters_and_cancels_tasks_in_a_real_browser() {
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        r#"
        [prices.scripted."*"]
        input_per_million = 2.5
        output_per_million = 10

        [budgets.default]
        period = "month"
        max_cost_usd = 100
        "#,
    )
    .unwrap();
    let path = config.path().to_str().unwrap().to_owned();
    let harness = Harness::start_with_plugins(&[("OPSPAWN_CONFIG", &path)], |plugins| {
        std::fs::write(plugins.path().join("broken.wasm"), b"not a component").unwrap();
    });
    run_scenario("open", &harness.server.base_url, &[]);
}

/// With tokens on, the page asks for one, refuses a wrong one with the
/// server's message, and with the right one shows the tenant's tasks and
/// streams their events.
#[test]
fn the_dashboard_asks_for_a_token_and_refuses_a_wrong_one() {
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        format!(
            "[[auth.tokens]]\ntenant = \"acme\"\nsha256 = \"{}\"\n",
            token_hash("acme-dashboard-token")
        ),
    )
    .unwrap();
    let path = config.path().to_str().unwrap().to_owned();
    let harness = Harness::start_with(&[("OPSPAWN_CONFIG", &path)]);
    run_scenario(
        "auth",
        &harness.server.base_url,
        &[("OPSPAWN_UI_TOKEN", "acme-dashboard-token")],
    );
}

/// Memories added from the form and the API are listed, searched, filtered
/// by namespace and deleted once confirmed; a task's page links to its
/// thread, which lists the thread's tasks and is deleted with them, refused
/// while one of them waits; screenshots of both views.
#[test]
fn the_dashboard_manages_memories_and_threads_in_a_real_browser() {
    let harness = Harness::start();
    run_scenario("memory", &harness.server.base_url, &[]);
}

/// LLM text streams into the task's page as the provider sends it: the
/// OpenAI adapter against the loopback mock, which streams its answer a
/// few frames at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_text_streams_into_the_task_page() {
    let provider = Provider::OpenAi;
    let mock = MockProviders::start().await;
    let harness = Harness::start_with_plugins(
        &[
            (provider.base_url_var(), &mock.base_url_for(provider)),
            (provider.key_var(), &provider.test_key()),
        ],
        |plugins| {
            plugins.add(
                provider.plugin(),
                provider.wasm(),
                Some(&provider.manifest()),
            );
        },
    );
    let base_url = harness.server.base_url.clone();
    // The mock answers on this runtime while the script runs beside it.
    tokio::task::spawn_blocking(move || run_scenario("stream", &base_url, &[]))
        .await
        .expect("the browser script ran");
}
