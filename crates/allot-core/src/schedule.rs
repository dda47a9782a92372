//! Weekly opening hours with dated exceptions, evaluated in a venue's IANA time zone.
//!
//! Civil times are turned into instants through `jiff`, so a schedule "09:00–17:00" stays
//! 09:00–17:00 local across daylight-saving changes.

use jiff::civil::{Date, Weekday};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};
use serde::{Deserialize, Serialize};

use crate::error::FieldErrors;

/// Minutes since local midnight, `00:00`..=`24:00` (so a day can close at midnight).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TimeOfDay(u16);

impl TimeOfDay {
    pub const MIDNIGHT: TimeOfDay = TimeOfDay(0);
    pub const END_OF_DAY: TimeOfDay = TimeOfDay(24 * 60);

    pub fn from_minutes(minutes: u16) -> Option<Self> {
        (minutes <= 24 * 60).then_some(Self(minutes))
    }
    pub fn minutes(self) -> u16 {
        self.0
    }
    /// The instant this time of day falls on `date` in `tz` (`24:00` is the next midnight).
    pub fn on(self, date: Date, tz: &TimeZone) -> Timestamp {
        let midnight = date.to_zoned(tz.clone()).map(|z| z.timestamp()).unwrap_or(Timestamp::UNIX_EPOCH);
        let hours = i64::from(self.0 / 60);
        let minutes = i64::from(self.0 % 60);
        let civil = date.at(0, 0, 0, 0).checked_add(hours.hours().minutes(minutes));
        match civil.and_then(|dt| dt.to_zoned(tz.clone())) {
            Ok(z) => z.timestamp(),
            Err(_) => midnight,
        }
    }
}

impl std::str::FromStr for TimeOfDay {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("'{s}' is not a time of day HH:MM (00:00 to 24:00)");
        let (h, m) = s.split_once(':').ok_or_else(bad)?;
        if h.len() != 2 || m.len() != 2 {
            return Err(bad());
        }
        let h: u16 = h.parse().map_err(|_| bad())?;
        let m: u16 = m.parse().map_err(|_| bad())?;
        if m >= 60 || h > 24 || (h == 24 && m != 0) {
            return Err(bad());
        }
        Ok(Self(h * 60 + m))
    }
}

impl std::fmt::Display for TimeOfDay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:02}:{:02}", self.0 / 60, self.0 % 60)
    }
}

impl Serialize for TimeOfDay {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TimeOfDay {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Day of week as three letters (`mon` … `sun`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Day {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

impl Day {
    pub const ALL: [Day; 7] = [Day::Mon, Day::Tue, Day::Wed, Day::Thu, Day::Fri, Day::Sat, Day::Sun];
    pub const WEEKDAYS: [Day; 5] = [Day::Mon, Day::Tue, Day::Wed, Day::Thu, Day::Fri];

    fn of(weekday: Weekday) -> Day {
        match weekday {
            Weekday::Monday => Day::Mon,
            Weekday::Tuesday => Day::Tue,
            Weekday::Wednesday => Day::Wed,
            Weekday::Thursday => Day::Thu,
            Weekday::Friday => Day::Fri,
            Weekday::Saturday => Day::Sat,
            Weekday::Sunday => Day::Sun,
        }
    }
}

/// One opening interval of a day, `open` < `close`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hours {
    pub open: TimeOfDay,
    pub close: TimeOfDay,
}

/// Opening hours repeated on the given days of every week.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeeklyHours {
    pub days: Vec<Day>,
    pub open: TimeOfDay,
    pub close: TimeOfDay,
}

/// A date whose hours replace the weekly ones; no hours means closed that day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleException {
    #[serde(with = "strict_date")]
    pub date: Date,
    #[serde(default)]
    pub hours: Vec<Hours>,
}

/// Weekly opening hours plus exceptions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeeklySchedule {
    pub weekly: Vec<WeeklyHours>,
    #[serde(default)]
    pub exceptions: Vec<ScheduleException>,
}

/// An opening window as instants, half-open `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: Timestamp,
    pub end: Timestamp,
}

/// Limits that keep a schedule cheap to evaluate.
pub const WEEKLY_ENTRIES_MAX: usize = 64;
pub const EXCEPTIONS_MAX: usize = 366;

impl WeeklySchedule {
    /// Open all day, every day.
    pub fn always() -> Self {
        Self {
            weekly: vec![WeeklyHours {
                days: Day::ALL.to_vec(),
                open: TimeOfDay::MIDNIGHT,
                close: TimeOfDay::END_OF_DAY,
            }],
            exceptions: Vec::new(),
        }
    }

    pub fn validate(&self) -> FieldErrors {
        let mut errors = FieldErrors::new();
        if self.weekly.len() > WEEKLY_ENTRIES_MAX {
            errors.add("weekly", format!("at most {WEEKLY_ENTRIES_MAX} entries"));
        }
        if self.exceptions.len() > EXCEPTIONS_MAX {
            errors.add("exceptions", format!("at most {EXCEPTIONS_MAX} entries"));
        }
        for (i, w) in self.weekly.iter().enumerate() {
            if w.open >= w.close {
                errors.add(format!("weekly[{i}].close"), "must be after open");
            }
            if w.days.is_empty() {
                errors.add(format!("weekly[{i}].days"), "must name at least one day");
            }
        }
        for (i, e) in self.exceptions.iter().enumerate() {
            for (j, h) in e.hours.iter().enumerate() {
                if h.open >= h.close {
                    errors.add(format!("exceptions[{i}].hours[{j}].close"), "must be after open");
                }
            }
        }
        errors
    }

    /// The local opening hours of `date`, sorted, overlapping entries merged.
    pub fn hours_on(&self, date: Date) -> Vec<Hours> {
        let mut hours: Vec<Hours> = match self.exceptions.iter().find(|e| e.date == date) {
            Some(exception) => exception.hours.clone(),
            None => {
                let day = Day::of(date.weekday());
                self.weekly
                    .iter()
                    .filter(|w| w.days.contains(&day))
                    .map(|w| Hours { open: w.open, close: w.close })
                    .collect()
            }
        };
        hours.sort_by_key(|h| h.open);
        let mut merged: Vec<Hours> = Vec::with_capacity(hours.len());
        for h in hours {
            match merged.last_mut() {
                Some(last) if h.open <= last.close => last.close = last.close.max(h.close),
                _ => merged.push(h),
            }
        }
        merged
    }

    /// Opening windows of `date` as instants in `tz`.
    pub fn windows_on(&self, date: Date, tz: &TimeZone) -> Vec<Window> {
        self.hours_on(date)
            .into_iter()
            .map(|h| Window { start: h.open.on(date, tz), end: h.close.on(date, tz) })
            .filter(|w| w.start < w.end)
            .collect()
    }

    /// Every opening window that intersects `[from, to)`, in order. Windows that run into the
    /// next day (a day open until 24:00 followed by one from 00:00) are joined.
    pub fn windows_between(&self, from: Timestamp, to: Timestamp, tz: &TimeZone) -> Vec<Window> {
        let mut out: Vec<Window> = Vec::new();
        let mut date = from.to_zoned(tz.clone()).date().yesterday().unwrap_or(Date::MIN);
        let last = to.to_zoned(tz.clone()).date();
        while date <= last {
            for w in self.windows_on(date, tz) {
                if w.end <= from || w.start >= to {
                    continue;
                }
                match out.last_mut() {
                    Some(prev) if w.start <= prev.end => prev.end = prev.end.max(w.end),
                    _ => out.push(w),
                }
            }
            date = match date.tomorrow() {
                Ok(d) => d,
                Err(_) => break,
            };
        }
        out
    }

    /// The joined opening window that contains all of `[start, end)`, if any.
    pub fn window_containing(&self, start: Timestamp, end: Timestamp, tz: &TimeZone) -> Option<Window> {
        self.windows_between(start, end, tz).into_iter().find(|w| w.start <= start && end <= w.end)
    }
}

/// Parses exactly `YYYY-MM-DD`; unlike `jiff`'s lenient parser, a date-time is refused rather
/// than silently cut to its date.
pub fn parse_date(s: &str) -> Result<Date, String> {
    let shaped = s.len() == 10
        && s.bytes().enumerate().all(|(i, b)| if i == 4 || i == 7 { b == b'-' } else { b.is_ascii_digit() });
    if !shaped {
        return Err(format!("'{s}' is not a date YYYY-MM-DD"));
    }
    s.parse().map_err(|_| format!("'{s}' is not a valid date"))
}

/// Serde helpers for strict `YYYY-MM-DD` fields (`#[serde(with = "strict_date")]`).
pub mod strict_date {
    use jiff::civil::Date;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(date: &Date, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(date)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Date, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_date(&s).map_err(serde::de::Error::custom)
    }

    /// For `Option<Date>` fields.
    pub mod option {
        use jiff::civil::Date;
        use serde::{Deserialize, Deserializer};

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Date>, D::Error> {
            Option::<String>::deserialize(d)?
                .map(|s| super::super::parse_date(&s).map_err(serde::de::Error::custom))
                .transpose()
        }
    }
}

/// Adds whole days to a date in the civil calendar.
pub fn add_days(date: Date, days: i64) -> Date {
    date.checked_add(days.days()).unwrap_or(date)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tz() -> TimeZone {
        TimeZone::get("Europe/Berlin").expect("bundled tz")
    }

    #[test]
    fn parses_times_of_day() {
        assert_eq!("09:30".parse::<TimeOfDay>().map(|t| t.minutes()), Ok(570));
        assert_eq!("24:00".parse::<TimeOfDay>().map(|t| t.minutes()), Ok(1440));
        assert!("24:01".parse::<TimeOfDay>().is_err());
        assert!("9:30".parse::<TimeOfDay>().is_err());
        assert!("09:60".parse::<TimeOfDay>().is_err());
    }

    #[test]
    fn exceptions_replace_weekly_hours_and_dst_keeps_local_time() {
        let schedule = WeeklySchedule {
            weekly: vec![WeeklyHours { days: Day::ALL.to_vec(), open: TimeOfDay(9 * 60), close: TimeOfDay(17 * 60) }],
            exceptions: vec![ScheduleException { date: jiff::civil::date(2026, 12, 25), hours: vec![] }],
        };
        assert!(schedule.windows_on(jiff::civil::date(2026, 12, 25), &tz()).is_empty());
        // 2026-03-29 is the spring-forward day in Berlin: opening is still 09:00 local (07:00Z).
        let w = schedule.windows_on(jiff::civil::date(2026, 3, 29), &tz());
        assert_eq!(w[0].start.to_string(), "2026-03-29T07:00:00Z");
        let w = schedule.windows_on(jiff::civil::date(2026, 3, 28), &tz());
        assert_eq!(w[0].start.to_string(), "2026-03-28T08:00:00Z");
    }

    #[test]
    fn round_the_clock_days_join_into_one_window() {
        let schedule = WeeklySchedule::always();
        let from: Timestamp = "2026-12-01T22:00:00Z".parse().expect("ts");
        let to: Timestamp = "2026-12-02T02:00:00Z".parse().expect("ts");
        assert!(schedule.window_containing(from, to, &tz()).is_some());
    }
}
