//! The plugin folder under attack: links that lead out of it, files dropped
//! in to take over a name, a watcher that wakes itself, a component
//! replaced by a copy that is still being written, and a component that
//! never finishes loading.

use std::io::Write;
use std::time::{Duration, Instant};

use opspawn_testkit::{Client, PluginFolder, Server, StatusCode};
use serde_json::Value;

use crate::{FINISH, SECRET, binary, calculator_task};

/// The listing's failure for a file, if it has one.
fn failure<'a>(listing: &'a Value, file: &str) -> Option<&'a str> {
    listing["failures"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| {
            f["file"]
                .as_str()
                .is_some_and(|path| path.ends_with(&format!("/{file}")))
        })
        .map(|f| f["error"].as_str().unwrap())
}

fn plugin<'a>(listing: &'a Value, name: &str) -> Option<&'a Value> {
    listing["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
}

/// Polls the listing until `check` holds.
async fn wait_for_listing(client: &Client, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, listing) = client.get("/v1/plugins").await.unwrap();
        if check(&listing) {
            return listing;
        }
        assert!(Instant::now() < deadline, "{what}: {listing:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Copies a component in under a hidden name, then renames it: the folder
/// sees one complete file.
fn drop_in(plugins: &PluginFolder, as_name: &str, wasm: &std::path::Path) {
    let hidden = plugins.path().join(format!(".{as_name}.partial"));
    std::fs::copy(wasm, &hidden).unwrap();
    std::fs::rename(&hidden, plugins.path().join(format!("{as_name}.wasm"))).unwrap();
}

async fn calculator_succeeds(client: &Client) {
    let id = client.submit(&calculator_task("6*7", "42")).await.unwrap();
    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    assert_eq!(task["status"], "succeeded", "{task:#}");
}

/// A file that resolves outside the plugin folder is refused with a reason
/// and never read: a link to a component elsewhere, a link to
/// `/proc/self/environ` (whose bytes would otherwise be quoted in the load
/// error), a manifest linked from elsewhere. A link inside the folder still
/// loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_that_lead_out_of_the_plugin_folder_are_refused_unread() {
    let plugins = PluginFolder::with_examples();
    let folder = plugins.path();
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::copy(
        opspawn_testkit::wasm("react"),
        elsewhere.path().join("planner.wasm"),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        elsewhere.path().join("planner.wasm"),
        folder.join("linked.wasm"),
    )
    .unwrap();
    std::os::unix::fs::symlink("/proc/self/environ", folder.join("environ.wasm")).unwrap();
    plugins.add("managed", "react", None);
    std::os::unix::fs::symlink("/proc/self/environ", folder.join("managed.toml")).unwrap();
    // A link that stays inside the folder is fine: scripted.wasm points at
    // a copy kept in a subfolder.
    std::fs::create_dir(folder.join("versions")).unwrap();
    std::fs::rename(
        folder.join("scripted.wasm"),
        folder.join("versions/scripted.wasm"),
    )
    .unwrap();
    std::os::unix::fs::symlink("versions/scripted.wasm", folder.join("scripted.wasm")).unwrap();

    let data = tempfile::tempdir().unwrap();
    let server = Server::start(
        binary(),
        data.path(),
        folder,
        &[("OPSPAWN_TEST_HIDDEN", SECRET)],
    )
    .unwrap();
    let client = server.client();
    let (_, listing) = client.get("/v1/plugins").await.unwrap();
    assert!(
        !listing.to_string().contains(SECRET),
        "the server's environment reached the listing: {listing:#}"
    );
    for file in ["linked.wasm", "environ.wasm", "managed.wasm"] {
        let reason =
            failure(&listing, file).unwrap_or_else(|| panic!("{file} is refused: {listing:#}"));
        assert!(
            reason.contains("outside the plugin folder"),
            "{file}: {reason}"
        );
    }
    for name in ["linked", "environ", "managed"] {
        assert!(
            plugin(&listing, name).is_none(),
            "{name} loaded: {listing:#}"
        );
    }
    assert!(
        plugin(&listing, "scripted").is_some(),
        "a link inside the folder loads: {listing:#}"
    );
    calculator_succeeds(&client).await;
    assert!(
        !server.log().contains(SECRET),
        "the server's environment reached the log"
    );
}

/// A file dropped in later cannot take a name already held: not a tool name
/// (a copy of the calculator under a name that sorts first), not a plugin
/// name (a planner whose manifest calls itself `calculator`). Each is
/// refused with the holder named, and the holder keeps serving, also after
/// a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_dropped_in_later_cannot_take_over_a_name() {
    let plugins = PluginFolder::with_examples();
    let data = tempfile::tempdir().unwrap();
    let mut server = Server::start(binary(), data.path(), plugins.path(), &[]).unwrap();
    let client = server.client();
    let (_, before) = client.get("/v1/plugins").await.unwrap();
    let calculator_sha = plugin(&before, "calculator").unwrap()["sha256"].clone();

    std::fs::write(
        plugins.path().join("0-impostor.toml"),
        "[plugin]\nname = \"calculator\"\n",
    )
    .unwrap();
    drop_in(&plugins, "0-impostor", &opspawn_testkit::wasm("react"));
    drop_in(&plugins, "aaa", &opspawn_testkit::wasm("calculator"));

    let check = |listing: &Value| {
        let tool = failure(listing, "aaa.wasm").unwrap_or_else(|| panic!("{listing:#}"));
        assert!(
            tool.contains("tool \"calculator\" is already offered by plugin \"calculator\""),
            "{tool}"
        );
        let name = failure(listing, "0-impostor.wasm").unwrap_or_else(|| panic!("{listing:#}"));
        assert!(
            name.contains("plugin name \"calculator\" is already held by")
                && name.contains("calculator.wasm"),
            "{name}"
        );
        let calculator = plugin(listing, "calculator").expect("the calculator stays");
        assert_eq!(calculator["sha256"], calculator_sha);
        assert_eq!(calculator["kind"], "tool");
        assert_eq!(calculator["tools"][0]["name"], "calculator");
        assert!(plugin(listing, "aaa").is_none(), "{listing:#}");
    };
    let listing = wait_for_listing(&client, "both drop-ins are refused", |listing| {
        failure(listing, "aaa.wasm").is_some() && failure(listing, "0-impostor.wasm").is_some()
    })
    .await;
    check(&listing);
    calculator_succeeds(&client).await;

    // After a restart the holder still wins: the older file goes first.
    server.restart().unwrap();
    let client = server.client();
    let (_, listing) = client.get("/v1/plugins").await.unwrap();
    check(&listing);
    calculator_succeeds(&client).await;
}

/// CPU time (user and system) the process has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf only reads a setting.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

/// The watcher rescans when a plugin file's contents change, not when a
/// scan opens and reads the files (which once woke it every 80 ms, for
/// ever), and a broken file is warned about once per version of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_rescans_on_changes_only_and_warns_once_per_version() {
    let plugins = PluginFolder::with_examples();
    std::fs::write(plugins.path().join("broken.wasm"), b"not a component").unwrap();
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(binary(), data.path(), plugins.path(), &[]).unwrap();
    let client = server.client();
    let count = |log: &str, what: &str| log.lines().filter(|l| l.contains(what)).count();
    let broken_warnings = |log: &str| {
        log.lines()
            .filter(|l| l.contains("plugin skipped") && l.contains("broken.wasm"))
            .count()
    };

    // A change: a new plugin is picked up.
    drop_in(&plugins, "planner2", &opspawn_testkit::wasm("react"));
    wait_for_listing(&client, "the new file loads", |listing| {
        plugin(listing, "planner2").is_some()
    })
    .await;
    // Then the folder is left alone: nothing should happen.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu_before = cpu_time(server.pid());
    let scans_before = count(&server.log(), "rescanning the plugin folder");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_cpu = cpu_time(server.pid()) - cpu_before;
    let log = server.log();
    let idle_scans = count(&log, "rescanning the plugin folder") - scans_before;
    assert_eq!(idle_scans, 0, "the watcher rescanned an unchanged folder");
    assert!(
        idle_cpu < Duration::from_millis(300),
        "an idle server used {idle_cpu:?} of CPU in 3 s"
    );
    assert_eq!(
        broken_warnings(&log),
        1,
        "the broken file is warned about once, however often the folder is scanned"
    );

    // A new version of the broken file is warned about again, once.
    std::fs::write(plugins.path().join("broken.wasm"), b"still not a component").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while broken_warnings(&server.log()) < 2 {
        assert!(
            Instant::now() < deadline,
            "the new version was not warned about"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(broken_warnings(&server.log()), 2);
}

/// A component overwritten in place (`cp new.wasm plugins/tool.wasm`) is
/// read half-written by a scan: the working version keeps serving, tasks
/// submitted meanwhile find their tool, and the new version replaces it
/// once complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_written_file_never_unloads_the_working_version() {
    let plugins = PluginFolder::with_examples();
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(binary(), data.path(), plugins.path(), &[]).unwrap();
    let client = server.client();
    let (_, listing) = client.get("/v1/plugins").await.unwrap();
    let working = plugin(&listing, "calculator").unwrap()["sha256"].clone();

    // The new version: the same tool built against WIT 0.1.0.
    let new = std::fs::read(opspawn_testkit::legacy_wasm("calculator")).unwrap();
    let path = plugins.path().join("calculator.wasm");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    file.write_all(&new[..new.len() / 2]).unwrap();
    file.flush().unwrap();

    // Well past the watcher's debounce, so the half file is scanned.
    let mut submitted = Vec::new();
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        let (status, task) = client
            .post("/v1/tasks", &calculator_task("6*7", "42"))
            .await
            .unwrap();
        assert_eq!(
            status,
            StatusCode::CREATED,
            "the calculator went away while its file was half-written: {task}"
        );
        submitted.push(task["id"].as_str().unwrap().to_owned());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, listing) = client.get("/v1/plugins").await.unwrap();
    assert_eq!(plugin(&listing, "calculator").unwrap()["sha256"], working);
    let reason = failure(&listing, "calculator.wasm")
        .unwrap_or_else(|| panic!("the half file was scanned and reported: {listing:#}"));
    assert!(reason.contains("keeps serving"), "{reason}");

    file.write_all(&new[new.len() / 2..]).unwrap();
    drop(file);
    let listing = wait_for_listing(&client, "the new version replaces the old", |listing| {
        plugin(listing, "calculator").is_some_and(|p| p["wit_version"] == "0.1.0")
    })
    .await;
    assert!(
        failure(&listing, "calculator.wasm").is_none(),
        "{listing:#}"
    );
    for id in submitted {
        let task = client.wait_until_finished(&id, FINISH).await.unwrap();
        assert_eq!(task["status"], "succeeded", "{task:#}");
    }
    calculator_succeeds(&client).await;
}

/// The misbehaving fixture made to hang in `describe`, asking for an hour
/// per call.
const HANGING_MANIFEST: &str = r#"
[plugin]
name = "hanging"

[limits]
call_timeout_ms = 3600000

[capabilities]
env = ["MISBEHAVING_DESCRIBE_SLEEP_MS"]
"#;

fn loading(listing: &Value) -> Vec<String> {
    listing["loading"]
        .as_array()
        .unwrap_or_else(|| panic!("the listing shows what is loading: {listing:#}"))
        .iter()
        .map(|l| l["file"].as_str().unwrap().to_owned())
        .collect()
}

/// Plugins load in the background: the server listens at once; a component
/// whose `describe` never returns (its manifest asks for an hour per call)
/// is listed as loading, then refused at the operator's `max_load_time`;
/// meanwhile the other plugins load, a file dropped in loads, a task runs
/// and `/healthz` stays quick. Compiling is logged, with how long it took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_load_in_the_background_and_a_hung_load_delays_no_other() {
    let plugins = PluginFolder::with_examples();
    plugins.add("hanging", "misbehaving", Some(HANGING_MANIFEST));
    let data = tempfile::tempdir().unwrap();
    // A cache of its own, so the components are compiled (and that logged).
    let cache = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let server = Server::start_listening(
        binary(),
        data.path(),
        plugins.path(),
        &[
            ("MISBEHAVING_DESCRIBE_SLEEP_MS", "3600000"),
            ("OPSPAWN_PLUGINS__MAX_LOAD_TIME", "20s"),
            ("OPSPAWN_CACHE_DIR", cache.path().to_str().unwrap()),
        ],
    )
    .unwrap();
    let listening = started.elapsed();
    assert!(
        listening < Duration::from_secs(10),
        "listening took {listening:?}"
    );
    let client = server.client();
    let started = Instant::now();
    let (status, health) = client.get("/healthz").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(health["loading"].as_u64().is_some(), "{health}");

    let listing = wait_for_listing(&client, "the other plugins load", |listing| {
        ["calculator", "react", "scripted"]
            .iter()
            .all(|name| plugin(listing, name).is_some())
    })
    .await;
    let hanging = plugins.path().join("hanging.wasm");
    let hanging = hanging.to_str().unwrap();
    assert_eq!(
        loading(&listing),
        [hanging],
        "the hung load is still running, and delayed nothing: {listing:#}"
    );
    calculator_succeeds(&client).await;
    // A tool nobody offers may still come from the hung load: not 422, but
    // "try again".
    let (status, refusal) = client
        .post(
            "/v1/tasks",
            &serde_json::json!({"goal": "g", "tools": ["nope"]}),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{refusal}");
    assert_eq!(refusal["error"]["code"], "plugins_loading", "{refusal}");
    drop_in(&plugins, "planner2", &opspawn_testkit::wasm("react"));
    let listing = wait_for_listing(&client, "a drop-in loads", |listing| {
        plugin(listing, "planner2").is_some()
    })
    .await;
    assert_eq!(loading(&listing), [hanging], "{listing:#}");

    let listing = wait_for_listing(&client, "the hung load is cut off", |listing| {
        failure(listing, "hanging.wasm").is_some()
    })
    .await;
    let reason = failure(&listing, "hanging.wasm").unwrap();
    assert!(reason.contains("max_load_time"), "{reason}");
    assert!(loading(&listing).is_empty(), "{listing:#}");
    assert!(plugin(&listing, "hanging").is_none());
    let (status, _) = client
        .post(
            "/v1/tasks",
            &serde_json::json!({"goal": "g", "tools": ["nope"]}),
        )
        .await
        .unwrap();
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "nothing is loading now"
    );

    let log = server.log();
    let calculator_compiles: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("calculator.wasm") && l.contains("compiling a component"))
        .collect();
    assert_eq!(
        calculator_compiles.len(),
        2,
        "compiling is logged when it starts and when it finishes: {calculator_compiles:#?}"
    );
    assert!(
        calculator_compiles[1].contains("took_ms"),
        "{calculator_compiles:#?}"
    );
}
