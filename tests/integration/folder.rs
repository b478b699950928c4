//! The plugin folder under attack: links that lead out of it.

use opspawn_testkit::{Client, PluginFolder, Server};
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
