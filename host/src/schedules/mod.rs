//! Schedules: recurring tasks from a cron expression in a time zone.
//!
//! This module holds the time arithmetic (when a schedule ticks next, and
//! what a due schedule does when the loop reaches it late) and the loop that
//! turns due ticks into tasks ([`runner`]). The store keeps schedules and
//! creates their runs in one transaction per batch; see docs/architecture.md,
//! "Schedules".

pub mod runner;

use std::str::FromStr;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds};
use serde::{Deserialize, Serialize};

use crate::store::Millis;

pub use runner::{QueueCaps, ScheduleConfig, ScheduleRunner};

/// What a schedule does about ticks that passed while no host could run
/// them (every host down, or the schedule's loop stalled past the grace).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MissedTicks {
    /// No catch-up: the missed ticks have no run; the next run is at the
    /// next tick to come.
    #[default]
    Skip,
    /// One run for all the missed ticks together (for the latest of them),
    /// then the next tick to come. Never one run per missed tick.
    RunOnce,
}

impl MissedTicks {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Skip => "skip",
            Self::RunOnce => "run_once",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "skip" => Some(Self::Skip),
            "run_once" => Some(Self::RunOnce),
            _ => None,
        }
    }
}

/// Why an expression or a zone was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("{0}")]
    Cron(String),
    #[error("unknown time zone {0:?}: use an IANA name such as Europe/Berlin or UTC")]
    Zone(String),
}

/// A parsed cron expression and the zone its fields are read in.
#[derive(Debug, Clone)]
pub struct CronSpec {
    cron: Cron,
    zone: Tz,
}

impl CronSpec {
    /// Parses `expression` (5 fields, or 6 with seconds first) in the IANA
    /// zone `zone`. An expression that never matches a time to come (the
    /// 30th of February) is refused too: its schedule would never run.
    pub fn parse(expression: &str, zone: &str) -> Result<Self, SpecError> {
        let zone = Tz::from_str(zone).map_err(|_| SpecError::Zone(zone.to_owned()))?;
        let fields = expression.split_whitespace().count();
        if !(5..=6).contains(&fields) {
            return Err(SpecError::Cron(format!(
                "a cron expression has 5 fields (minute hour day-of-month month day-of-week), \
                 or 6 with seconds first; {expression:?} has {fields}"
            )));
        }
        let parser = CronParser::builder().seconds(Seconds::Optional).build();
        // Client text reaches a third-party parser: a panic in it must be a
        // refusal, not a server fault.
        let parsed = std::panic::catch_unwind(|| parser.parse(expression))
            .map_err(|_| SpecError::Cron(format!("invalid cron expression {expression:?}")))?;
        let cron = parsed
            .map_err(|e| SpecError::Cron(format!("invalid cron expression {expression:?}: {e}")))?;
        let spec = Self { cron, zone };
        if spec.next_after(crate::store::now_millis()).is_none() {
            return Err(SpecError::Cron(format!(
                "the cron expression {expression:?} matches no time to come"
            )));
        }
        Ok(spec)
    }

    fn local(&self, at: Millis) -> Option<DateTime<Tz>> {
        Utc.timestamp_millis_opt(at)
            .single()
            .map(|utc| utc.with_timezone(&self.zone))
    }

    /// The first tick strictly after `at`; `None` if there is none.
    pub fn next_after(&self, at: Millis) -> Option<Millis> {
        let local = self.local(at)?;
        let next = self.cron.find_next_occurrence(&local, false).ok()?;
        Some(next.timestamp_millis())
    }

    /// The last tick at or before `at`; `None` if there is none.
    pub fn latest_at_or_before(&self, at: Millis) -> Option<Millis> {
        let local = self.local(at)?;
        let previous = self.cron.find_previous_occurrence(&local, true).ok()?;
        Some(previous.timestamp_millis())
    }

    /// The next `count` ticks after `at`.
    pub fn upcoming(&self, at: Millis, count: usize) -> Vec<Millis> {
        let mut ticks = Vec::with_capacity(count);
        let mut from = at;
        while ticks.len() < count {
            match self.next_after(from) {
                Some(tick) => {
                    ticks.push(tick);
                    from = tick;
                }
                None => break,
            }
        }
        ticks
    }
}

/// What the loop does with a schedule due at `due` when it reaches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Firing {
    /// Create a run for this tick; `None`: create none.
    pub run_for: Option<Millis>,
    /// The schedule's next due time; `None` when it never ticks again.
    pub next_run_at: Option<Millis>,
}

/// Decides what a schedule due at `due` does at `now`.
///
/// A tick reached within `grace` of its time is on time: it runs, and the
/// next tick after it is due next (so a loop that fell a little behind
/// catches up tick by tick, leaving no gap). A tick reached later than that
/// was missed, and so was every tick since: `policy` says whether they get
/// no run or one run together, and the schedule continues at the next tick
/// after `now`. A run that waited for room in a full queue
/// (`waited_for_room`) was not missed: it runs now, late, and the ticks that
/// passed while it waited are folded into it.
pub fn firing(
    spec: &CronSpec,
    due: Millis,
    now: Millis,
    grace: Millis,
    policy: MissedTicks,
    waited_for_room: bool,
) -> Firing {
    if waited_for_room {
        return Firing {
            run_for: Some(due),
            next_run_at: spec.next_after(now.max(due)),
        };
    }
    if now - due <= grace {
        return Firing {
            run_for: Some(due),
            next_run_at: spec.next_after(due),
        };
    }
    let run_for = match policy {
        MissedTicks::Skip => None,
        MissedTicks::RunOnce => Some(spec.latest_at_or_before(now).unwrap_or(due).max(due)),
    };
    Firing {
        run_for,
        next_run_at: spec.next_after(now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Millis {
        crate::rfc3339::parse(text).expect("a valid time")
    }

    fn spec(expression: &str, zone: &str) -> CronSpec {
        CronSpec::parse(expression, zone).expect("a valid schedule")
    }

    #[test]
    fn expressions_have_five_or_six_fields_and_zones_are_iana_names() {
        assert!(CronSpec::parse("*/5 * * * *", "UTC").is_ok());
        assert!(CronSpec::parse("*/2 * * * * *", "Europe/Berlin").is_ok());
        for bad in [
            "",
            "* * * *",
            "0 0 0 * * * *",
            "61 * * * *",
            "nonsense * * * *",
        ] {
            assert!(
                matches!(CronSpec::parse(bad, "UTC"), Err(SpecError::Cron(_))),
                "{bad:?} is refused"
            );
        }
        assert!(
            matches!(
                CronSpec::parse("0 0 30 2 *", "UTC"),
                Err(SpecError::Cron(m)) if m.contains("no time to come")
            ),
            "the 30th of February never comes"
        );
        assert_eq!(
            CronSpec::parse("* * * * *", "Mars/Olympus").unwrap_err(),
            SpecError::Zone("Mars/Olympus".into())
        );
    }

    /// 09:00 in Berlin is 08:00 UTC in winter and 07:00 UTC in summer:
    /// across the change (29 March 2026) the schedule keeps local time, one
    /// run a day.
    #[test]
    fn the_next_tick_keeps_local_time_across_a_dst_change() {
        let nine = spec("0 9 * * *", "Europe/Berlin");
        assert_eq!(
            nine.upcoming(at("2026-03-27T12:00:00Z"), 3),
            [
                at("2026-03-28T08:00:00Z"),
                at("2026-03-29T07:00:00Z"),
                at("2026-03-30T07:00:00Z"),
            ]
        );
        // And back in autumn (25 October 2026).
        assert_eq!(
            nine.upcoming(at("2026-10-24T12:00:00Z"), 2),
            [at("2026-10-25T08:00:00Z"), at("2026-10-26T08:00:00Z")]
        );
        // Every 30 minutes across the spring gap (02:00–03:00 local does not
        // exist): the ticks go on every 30 minutes of real time, none twice.
        let half_hourly = spec("*/30 * * * *", "Europe/Berlin");
        let ticks = half_hourly.upcoming(at("2026-03-29T00:00:00Z"), 4);
        assert_eq!(
            ticks,
            [
                at("2026-03-29T00:30:00Z"),
                at("2026-03-29T01:00:00Z"),
                at("2026-03-29T01:30:00Z"),
                at("2026-03-29T02:00:00Z"),
            ]
        );
        // In UTC nothing moves.
        assert_eq!(
            spec("0 9 * * *", "UTC").next_after(at("2026-03-28T12:00:00Z")),
            Some(at("2026-03-29T09:00:00Z"))
        );
    }

    #[test]
    fn seconds_are_optional_and_ticks_are_strictly_after() {
        let every_second = spec("* * * * * *", "UTC");
        let t = at("2026-01-01T00:00:00Z");
        assert_eq!(every_second.next_after(t), Some(t + 1000));
        assert_eq!(every_second.next_after(t + 400), Some(t + 1000));
        assert_eq!(every_second.latest_at_or_before(t + 2400), Some(t + 2000));
        assert_eq!(every_second.upcoming(t, 3), [t + 1000, t + 2000, t + 3000]);
    }

    #[test]
    fn a_tick_reached_in_time_runs_and_the_next_follows_it() {
        let every_second = spec("* * * * * *", "UTC");
        let due = at("2026-01-01T00:00:10Z");
        for policy in [MissedTicks::Skip, MissedTicks::RunOnce] {
            // Reached 2.5 s late, within a 5 s grace: it runs, and the tick
            // after it (already past) is due next, so nothing is skipped.
            assert_eq!(
                firing(&every_second, due, due + 2500, 5000, policy, false),
                Firing {
                    run_for: Some(due),
                    next_run_at: Some(due + 1000)
                }
            );
        }
    }

    #[test]
    fn missed_ticks_are_skipped_or_run_once_never_one_run_each() {
        let every_minute = spec("* * * * *", "UTC");
        let due = at("2026-01-01T00:10:00Z");
        // Every host was down for ten ticks and a bit.
        let now = at("2026-01-01T00:20:30Z");
        assert_eq!(
            firing(&every_minute, due, now, 5000, MissedTicks::Skip, false),
            Firing {
                run_for: None,
                next_run_at: Some(at("2026-01-01T00:21:00Z"))
            },
            "skip: no run for the gap; the next tick to come"
        );
        assert_eq!(
            firing(&every_minute, due, now, 5000, MissedTicks::RunOnce, false),
            Firing {
                run_for: Some(at("2026-01-01T00:20:00Z")),
                next_run_at: Some(at("2026-01-01T00:21:00Z"))
            },
            "run_once: one run, for the latest missed tick; then the next to come"
        );
        // One tick missed by more than the grace is missed too.
        let once = firing(
            &every_minute,
            due,
            due + 20_000,
            5000,
            MissedTicks::Skip,
            false,
        );
        assert_eq!(once.run_for, None);
        assert_eq!(once.next_run_at, Some(due + 60_000));
    }

    #[test]
    fn a_run_that_waited_for_room_runs_late_and_folds_the_ticks_it_waited_through() {
        let every_second = spec("* * * * * *", "UTC");
        let due = at("2026-01-01T00:00:10Z");
        let now = due + 7_300;
        for policy in [MissedTicks::Skip, MissedTicks::RunOnce] {
            assert_eq!(
                firing(&every_second, due, now, 1000, policy, true),
                Firing {
                    run_for: Some(due),
                    next_run_at: Some(due + 8000)
                }
            );
        }
    }
}
