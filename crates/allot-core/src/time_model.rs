//! The four time models and how a claim request becomes a concrete interval under each.

use jiff::Timestamp;
use jiff::civil::Date;
use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};

use crate::error::{FieldErrors, ValidationError};
use crate::schedule::{TimeOfDay, WeeklySchedule, add_days};

pub const SLOT_MINUTES_MAX: u32 = 24 * 60;
pub const NIGHTS_MAX: u32 = 365;
pub const FREE_MINUTES_MAX: u32 = 7 * 24 * 60;

/// A fixed grid inside a weekly schedule; a claim is one or more consecutive whole slots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotsModel {
    pub slot_minutes: u32,
    pub schedule: WeeklySchedule,
    #[serde(default = "default_max_slots")]
    pub max_slots: u32,
}

/// Whole nights in the venue's time zone, `check_in`..`check_out`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NightsModel {
    #[serde(default = "default_check_in")]
    pub check_in_time: TimeOfDay,
    #[serde(default = "default_check_out")]
    pub check_out_time: TimeOfDay,
    #[serde(default = "one")]
    pub min_nights: u32,
    #[serde(default = "default_max_nights")]
    pub max_nights: u32,
}

/// Any step-aligned interval inside opening hours (always open without a schedule).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FreeModel {
    pub step_minutes: u32,
    pub min_minutes: u32,
    pub max_minutes: u32,
    #[serde(default)]
    pub schedule: Option<WeeklySchedule>,
}

/// How a resource's time is cut into claimable pieces. `Events`: claimable only through an
/// event (a show, a flight), for exactly its window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TimeModel {
    Slots(SlotsModel),
    Nights(NightsModel),
    Free(FreeModel),
    Events,
}

fn default_max_slots() -> u32 {
    16
}
fn default_check_in() -> TimeOfDay {
    TimeOfDay::from_minutes(15 * 60).unwrap_or(TimeOfDay::MIDNIGHT)
}
fn default_check_out() -> TimeOfDay {
    TimeOfDay::from_minutes(11 * 60).unwrap_or(TimeOfDay::MIDNIGHT)
}
fn one() -> u32 {
    1
}
fn default_max_nights() -> u32 {
    30
}

/// What the customer asked for, already parsed at the edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimRequest {
    Interval {
        start: Timestamp,
        end: Timestamp,
    },
    Stay {
        check_in: Date,
        check_out: Date,
    },
    /// A seat of an event: the event's own window.
    EventWindow {
        start: Timestamp,
        end: Timestamp,
    },
}

/// The interval a valid request covers, and how many priced units (slots, nights, minutes, 1 seat).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    pub start: Timestamp,
    pub end: Timestamp,
    pub units: u32,
}

impl TimeModel {
    pub fn kind(&self) -> &'static str {
        match self {
            TimeModel::Slots(SlotsModel { .. }) => "slots",
            TimeModel::Nights(NightsModel { .. }) => "nights",
            TimeModel::Free(FreeModel { .. }) => "free",
            TimeModel::Events => "events",
        }
    }

    pub fn validate(&self) -> FieldErrors {
        let mut e = FieldErrors::new();
        match self {
            TimeModel::Slots(SlotsModel { slot_minutes, schedule, max_slots }) => {
                if *slot_minutes == 0 || *slot_minutes > SLOT_MINUTES_MAX {
                    e.add("slot_minutes", format!("must be between 1 and {SLOT_MINUTES_MAX}"));
                }
                if *max_slots == 0 || *max_slots > 96 {
                    e.add("max_slots", "must be between 1 and 96");
                }
                e.merge(schedule.validate().prefixed("schedule"));
            }
            TimeModel::Nights(NightsModel { check_in_time, check_out_time, min_nights, max_nights }) => {
                if check_out_time > check_in_time {
                    e.add("check_out_time", "must not be after check_in_time, or consecutive stays would overlap");
                }
                if *min_nights == 0 || min_nights > max_nights || *max_nights > NIGHTS_MAX {
                    e.add("max_nights", format!("need 1 <= min_nights <= max_nights <= {NIGHTS_MAX}"));
                }
            }
            TimeModel::Free(FreeModel { step_minutes, min_minutes, max_minutes, schedule }) => {
                if *step_minutes == 0 || *step_minutes > SLOT_MINUTES_MAX {
                    e.add("step_minutes", format!("must be between 1 and {SLOT_MINUTES_MAX}"));
                } else if min_minutes % step_minutes != 0 || max_minutes % step_minutes != 0 {
                    e.add("min_minutes", "min_minutes and max_minutes must be multiples of step_minutes");
                }
                if *min_minutes == 0 || min_minutes > max_minutes || *max_minutes > FREE_MINUTES_MAX {
                    e.add("max_minutes", format!("need 1 <= min_minutes <= max_minutes <= {FREE_MINUTES_MAX}"));
                }
                if let Some(s) = schedule {
                    e.merge(s.validate().prefixed("schedule"));
                }
            }
            TimeModel::Events => {}
        }
        e
    }

    /// Turns a request into the interval it claims, or says which field breaks which rule.
    pub fn resolve(&self, request: ClaimRequest, tz: &TimeZone) -> Result<Resolved, ValidationError> {
        match (self, request) {
            (
                TimeModel::Slots(SlotsModel { slot_minutes, schedule, max_slots }),
                ClaimRequest::Interval { start, end },
            ) => {
                // Checked before the schedule is consulted, so a huge interval costs nothing.
                if end.as_second().saturating_sub(start.as_second())
                    > i64::from(*max_slots) * i64::from(*slot_minutes) * 60
                {
                    return Err(ValidationError::field("end", format!("at most {max_slots} consecutive slots")));
                }
                let r = resolve_grid(start, end, *slot_minutes, Some(schedule), tz)?;
                Ok(Resolved { units: r.units / slot_minutes, ..r })
            }
            (
                TimeModel::Free(FreeModel { step_minutes, min_minutes, max_minutes, schedule }),
                ClaimRequest::Interval { start, end },
            ) => {
                let minutes = end.as_second().saturating_sub(start.as_second()) / 60;
                if start < end && (minutes < i64::from(*min_minutes) || minutes > i64::from(*max_minutes)) {
                    return Err(ValidationError::field(
                        "end",
                        format!("duration must be between {min_minutes} and {max_minutes} minutes"),
                    ));
                }
                resolve_grid(start, end, *step_minutes, schedule.as_ref(), tz)
            }
            (
                TimeModel::Nights(NightsModel { check_in_time, check_out_time, min_nights, max_nights }),
                ClaimRequest::Stay { check_in, check_out },
            ) => {
                let nights = check_in.until(check_out).map(|s| s.get_days()).unwrap_or(0);
                if nights <= 0 {
                    return Err(ValidationError::field("check_out", "must be after check_in"));
                }
                let nights = u32::try_from(nights).unwrap_or(u32::MAX);
                if nights < *min_nights || nights > *max_nights {
                    return Err(ValidationError::field(
                        "check_out",
                        format!("a stay is {min_nights} to {max_nights} nights"),
                    ));
                }
                let start = check_in_time.on(check_in, tz);
                let end = check_out_time.on(check_out, tz);
                if start >= end {
                    // Only at the very ends of the calendar, where local times cannot be formed.
                    return Err(ValidationError::field("check_in", "outside the supported range of dates"));
                }
                Ok(Resolved { start, end, units: nights })
            }
            (TimeModel::Events, ClaimRequest::EventWindow { start, end }) => Ok(Resolved { start, end, units: 1 }),
            (model, _) => Err(ValidationError::field("resource_id", wrong_shape(model))),
        }
    }

    /// Nights of a stay as `(date, start, end)` for availability, in order.
    pub fn nights_between(&self, from: Date, to: Date, tz: &TimeZone) -> Vec<(Date, Timestamp, Timestamp)> {
        let TimeModel::Nights(NightsModel { check_in_time, check_out_time, .. }) = self else { return Vec::new() };
        let mut out = Vec::new();
        let mut d = from;
        while d < to {
            let next = add_days(d, 1);
            let (start, end) = (check_in_time.on(d, tz), check_out_time.on(next, tz));
            // At the ends of the calendar local times cannot be formed: no such night.
            if start < end {
                out.push((d, start, end));
            }
            if next == d {
                break;
            }
            d = next;
        }
        out
    }
}

fn wrong_shape(model: &TimeModel) -> &'static str {
    match model {
        TimeModel::Slots(SlotsModel { .. }) | TimeModel::Free(FreeModel { .. }) => {
            "this resource is booked with start and end"
        }
        TimeModel::Nights(NightsModel { .. }) => "this resource is booked with check_in and check_out",
        TimeModel::Events => "this resource is a seat: book it with event_id",
    }
}

/// Shared rule of `slots` and `free`: whole steps, aligned to the opening (or local midnight
/// when always open), inside one opening window. `units` is the duration in minutes.
fn resolve_grid(
    start: Timestamp,
    end: Timestamp,
    step_minutes: u32,
    schedule: Option<&WeeklySchedule>,
    tz: &TimeZone,
) -> Result<Resolved, ValidationError> {
    if start >= end {
        return Err(ValidationError::field("end", "must be after start"));
    }
    // Capacity is kept in whole seconds; a fraction would be silently cut.
    if start.subsec_nanosecond() != 0 {
        return Err(ValidationError::field("start", "must be a whole second"));
    }
    if end.subsec_nanosecond() != 0 {
        return Err(ValidationError::field("end", "must be a whole second"));
    }
    let step = i64::from(step_minutes) * 60;
    let duration = end.as_second() - start.as_second();
    if duration % step != 0 {
        return Err(ValidationError::field(
            "end",
            format!("duration must be a whole number of {step_minutes}-minute steps"),
        ));
    }
    let anchor = match schedule {
        Some(s) => match s.window_containing(start, end, tz) {
            Some(w) => w.start,
            None => return Err(ValidationError::field("start", "outside opening hours")),
        },
        None => start.to_zoned(tz.clone()).start_of_day().map(|z| z.timestamp()).unwrap_or(start),
    };
    let offset = start.duration_since(anchor);
    if offset.as_secs() % step != 0 || offset.subsec_nanos() != 0 || start.subsec_nanosecond() != 0 {
        return Err(ValidationError::field(
            "start",
            format!("must be aligned to the {step_minutes}-minute grid starting at {anchor}"),
        ));
    }
    Ok(Resolved { start, end, units: u32::try_from(duration / 60).unwrap_or(u32::MAX) })
}
