//! `GET /v1/tasks/{id}/events`: a task's events as Server-Sent Events.
//!
//! A subscriber first gets every journaled event after the one it names
//! (`Last-Event-ID`, or from the start), then live events as they happen,
//! and the stream ends after `task.finished`. Live events come from this
//! host's bus; the store is polled as well, so a task running on another
//! host (or a subscriber that fell behind) still sees every event in order.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Extension, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use super::auth::Tenant;
use super::{ApiError, ApiPath, AppState};
use crate::errors::Code;
use crate::events::LiveEvent;
use crate::store::{EventRecord, Store};

/// How often the store is checked for events this host did not publish.
const POLL: Duration = Duration::from_millis(1000);

/// The task's events as Server-Sent Events: every journaled event after
/// `Last-Event-ID` (or from the start), then live ones; the stream ends
/// after `task.finished`. Each event is named after its `kind`, carries its
/// `seq` as its id and a `TaskEvent` as its data.
#[utoipa::path(
    get,
    path = "/v1/tasks/{id}/events",
    tag = "tasks",
    security(("api_token" = [])),
    params(
        ("id" = String, Path, min_length = 1, description = "The task's id"),
        ("Last-Event-ID" = Option<i64>, Header,
            description = "Resume after this event's `seq`"),
    ),
    responses(
        (status = 200, description = "`text/event-stream`: `event: <kind>`, `id: <seq>`, \
            `data: <TaskEvent>`", content_type = "text/event-stream",
            body = super::openapi::TaskEventFrame),
        super::openapi::TaskEventsErrors,
    ),
)]
pub async fn task_events(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    super::owned_task(&state, &tenant, &id).await?;
    let after = match headers.get("last-event-id") {
        None => 0,
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<i64>().ok())
            .ok_or_else(|| {
                ApiError::new(
                    Code::InvalidLastEventId,
                    "Last-Event-ID must be an event number",
                )
            })?,
    };
    // Subscribe before reading history so nothing falls between the two.
    let live = state.events.subscribe();
    let (sender, receiver) = mpsc::channel(256);
    tokio::spawn(follow(state.store.clone(), id, after, live, sender));
    Ok(Sse::new(ReceiverStream::new(receiver)).keep_alive(KeepAlive::default()))
}

type Sender = mpsc::Sender<Result<Event, Infallible>>;

/// Sends journaled events after `last`, in order, until the final one.
/// Returns `Some(last)` to continue, `None` when the stream is over.
async fn catch_up(store: &dyn Store, id: &str, mut last: i64, sender: &Sender) -> Option<i64> {
    let events = match store.events_after(id, last).await {
        Ok(events) => events,
        Err(error) => {
            tracing::warn!(task = %id, %error, "reading task events failed");
            return Some(last);
        }
    };
    for event in events {
        last = event.seq;
        let is_final = event.is_final();
        sender.send(Ok(sse_event(&event))).await.ok()?;
        if is_final {
            return None;
        }
    }
    Some(last)
}

async fn follow(
    store: std::sync::Arc<dyn Store>,
    id: String,
    after: i64,
    mut live: broadcast::Receiver<LiveEvent>,
    sender: Sender,
) {
    let Some(mut last) = catch_up(&*store, &id, after, &sender).await else {
        return;
    };
    let mut poll = tokio::time::interval(POLL);
    loop {
        let next = tokio::select! {
            received = live.recv() => received,
            _ = poll.tick() => {
                match catch_up(&*store, &id, last, &sender).await {
                    Some(seq) => { last = seq; continue }
                    None => return,
                }
            }
            _ = sender.closed() => return,
        };
        match next {
            Ok(event) if event.task_id != id => {}
            Ok(event) => {
                if event.seq <= last {
                    continue;
                }
                if event.seq > last + 1 {
                    // Something was missed: the store has it.
                    match catch_up(&*store, &id, last, &sender).await {
                        Some(seq) => last = seq,
                        None => return,
                    }
                    continue;
                }
                last = event.seq;
                if sender.send(Ok(sse_event(&event))).await.is_err() || event.is_final() {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {
                match catch_up(&*store, &id, last, &sender).await {
                    Some(seq) => last = seq,
                    None => return,
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

fn sse_event(event: &EventRecord) -> Event {
    let body = serde_json::json!({
        "task_id": event.task_id,
        "seq": event.seq,
        "kind": event.kind,
        "at": super::views::timestamp(event.at),
        "data": event.data,
    });
    Event::default()
        .event(&event.kind)
        .data(body.to_string())
        .id(event.seq.to_string())
}
