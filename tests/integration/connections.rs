//! The API against clients that hold connections open: silent sockets,
//! headers or a body sent a byte at a time, more connections than the cap.
//! Each is cut off in time, and `/healthz` and real tasks carry on.

use std::time::{Duration, Instant};

use opspawn_testkit::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{FINISH, Harness, calculator_task};

/// `host:port` of the server.
fn address(harness: &Harness) -> String {
    harness
        .server
        .base_url
        .trim_start_matches("http://")
        .to_owned()
}

/// How many descriptors the server process has open.
fn open_descriptors(harness: &Harness) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", harness.server.pid()))
        .unwrap()
        .count()
}

/// Reads what the server sends until it closes the connection or `wait`
/// passes; `None` if it was still open then.
async fn read_until_closed(stream: &mut TcpStream, wait: Duration) -> Option<String> {
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    let read = async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) => break,
                Err(error) => {
                    received.extend_from_slice(format!("[{error}]").as_bytes());
                    break;
                }
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
        }
    };
    tokio::time::timeout(wait, read).await.ok()?;
    Some(String::from_utf8_lossy(&received).into_owned())
}

/// `/healthz` answers within a second, several times over.
async fn healthz_is_quick(harness: &Harness) {
    let client = harness.client();
    for _ in 0..5 {
        let started = Instant::now();
        let (status, _) = client.get("/healthz").await.unwrap();
        assert_eq!(status, StatusCode::OK);
        let took = started.elapsed();
        assert!(took < Duration::from_secs(1), "healthz took {took:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Silent connections, headers that never end and a body that never
/// arrives are all closed once their time is up (the body with `408
/// request_timeout`), while `/healthz` stays quick and a task succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_silent_clients_are_cut_off_in_time() {
    let harness = Harness::start_with(&[
        ("OPSPAWN_HTTP__HEADER_READ_TIMEOUT", "1s"),
        ("OPSPAWN_HTTP__BODY_READ_TIMEOUT", "1s"),
        // Well past the others, so a loaded machine cannot reorder them.
        ("OPSPAWN_HTTP__IDLE_TIMEOUT", "4s"),
    ]);
    let address = address(&harness);
    let baseline = open_descriptors(&harness);

    let mut silent = Vec::new();
    let mut unfinished_headers = Vec::new();
    for _ in 0..100 {
        silent.push(TcpStream::connect(&address).await.unwrap());
        let mut stream = TcpStream::connect(&address).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: opspawn\r\n")
            .await
            .unwrap();
        unfinished_headers.push(stream);
    }
    let mut unfinished_body = TcpStream::connect(&address).await.unwrap();
    unfinished_body
        .write_all(
            b"POST /v1/tasks HTTP/1.1\r\nHost: opspawn\r\nContent-Type: application/json\r\n\
              Content-Length: 1000\r\n\r\n{\"goal\": \"",
        )
        .await
        .unwrap();
    // A keep-alive connection that answers one request, then goes quiet.
    let mut idle = TcpStream::connect(&address).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: opspawn\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    idle.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");

    healthz_is_quick(&harness).await;
    let client = harness.client();
    let id = client.submit(&calculator_task("6*7", "42")).await.unwrap();
    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    assert_eq!(task["status"], "succeeded", "{task:#}");

    let answer = read_until_closed(&mut unfinished_body, Duration::from_secs(8))
        .await
        .expect("the unfinished body was cut off");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"request_timeout\""), "{answer}");
    for stream in silent.iter_mut().chain(&mut unfinished_headers) {
        let answer = read_until_closed(stream, Duration::from_secs(8)).await;
        assert!(
            answer.is_some_and(|a| !a.starts_with("HTTP/1.1 200")),
            "a connection that never finished its headers was left open"
        );
    }
    assert!(
        read_until_closed(&mut idle, Duration::from_secs(8))
            .await
            .is_some(),
        "an idle keep-alive connection was left open"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_descriptors(&harness) > baseline + 10 {
        assert!(
            Instant::now() < deadline,
            "the server still holds {} descriptors (it started with {baseline})",
            open_descriptors(&harness)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Past `max_connections`, a new connection is closed at once and the log
/// says why; once the hogs are cut off, clients are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_cap_new_connections_are_closed_with_a_log_line() {
    let harness = Harness::start_with(&[
        ("OPSPAWN_HTTP__MAX_CONNECTIONS", "40"),
        ("OPSPAWN_HTTP__HEADER_READ_TIMEOUT", "3s"),
    ]);
    let address = address(&harness);
    let mut hogs = Vec::new();
    for _ in 0..40 {
        hogs.push(TcpStream::connect(&address).await.unwrap());
    }
    // Let the server accept them all.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut refused = TcpStream::connect(&address).await.unwrap();
    let _ = refused
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: opspawn\r\n\r\n")
        .await;
    let answer = read_until_closed(&mut refused, Duration::from_secs(2))
        .await
        .expect("a connection past the cap is closed at once");
    // Closed unanswered: an end of stream, or a reset since the request
    // was never read.
    assert!(
        !answer.starts_with("HTTP/"),
        "it was served past the cap: {answer}"
    );
    assert!(
        harness.server.log().contains("connection limit reached"),
        "the log says the cap was reached"
    );

    // The hogs are cut off after the header timeout, freeing their slots.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match harness.client().get("/healthz").await {
            Ok((StatusCode::OK, _)) => break,
            _ => assert!(Instant::now() < deadline, "the API never came back"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(harness.server.log().contains("accepting connections again"));
    drop(hogs);
}
