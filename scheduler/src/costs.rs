//! What renders cost and what tokens may spend. A render costs the device time it took on its
//! worker times its tier's weight (`[scheduler.costs]`), in device-seconds; a cache hit costs
//! nothing. A token may carry a budget per period (a UTC day, week or month); a submit or an order
//! that would pass it is refused whole with the budget, what is used and when it resets.
//!
//! Estimates come from the recent renders of the same tier and size ([`Estimates`]): their
//! median, or where there are none, the tier's median time per sample scaled to the size, or
//! before anything of the tier has rendered, `first_estimate_seconds`.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};
use kiln_protocol::{RenderRequest, Tier};

use crate::config::CostsConfig;

/// A budget's period, in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    /// From midnight to midnight.
    Day,
    /// From Monday midnight.
    Week,
    /// From the first of the month.
    Month,
}

impl Period {
    /// Its name: day, week or month.
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
        }
    }

    /// The period `now_ms` falls in: when it began and when the next begins, unix ms.
    pub fn bounds(self, now_ms: i64) -> (i64, i64) {
        let ts = Timestamp::from_millisecond(now_ms).unwrap_or(Timestamp::UNIX_EPOCH);
        let date = ts.to_zoned(TimeZone::UTC).date();
        let (start, next) = match self {
            Period::Day => (date, date.checked_add(1.day())),
            Period::Week => {
                let back = i64::from(date.weekday().to_monday_zero_offset());
                let monday = date.checked_sub(back.days()).unwrap_or(date);
                (monday, monday.checked_add(1.week()))
            }
            Period::Month => {
                let first = date.first_of_month();
                (first, first.checked_add(1.month()))
            }
        };
        let ms = |d: jiff::civil::Date| {
            d.to_zoned(TimeZone::UTC).map(|z| z.timestamp().as_millisecond()).unwrap_or(i64::MAX)
        };
        (ms(start), next.map(ms).unwrap_or(i64::MAX))
    }
}

impl FromStr for Period {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "day" => Ok(Period::Day),
            "week" => Ok(Period::Week),
            "month" => Ok(Period::Month),
            other => Err(format!("{other:?}: expected day, week or month")),
        }
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A token's budget: weighted device-seconds per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Device-seconds it may spend in a period.
    pub seconds: u64,
    /// The period.
    pub period: Period,
}

/// Why a submit or order was refused: its budget would pass. The message says the budget, what
/// is used, what is in flight, what this asks and when it resets.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "budget: the token {client:?} may spend {budget} device-seconds a {period}; it has used {used:.1} and has {in_flight:.1} in flight, and this asks about {asked:.1} more; it resets at {resets}"
)]
pub struct OverBudget {
    /// The token.
    pub client: String,
    /// Its budget, device-seconds.
    pub budget: u64,
    /// Its period.
    pub period: Period,
    /// Spent this period, device-seconds.
    pub used: f64,
    /// Estimated for its live jobs.
    pub in_flight: f64,
    /// Estimated for what it asked.
    pub asked: f64,
    /// When the period ends (RFC 3339).
    pub resets: String,
    /// When the period ends, unix ms.
    pub resets_ms: i64,
}

/// Renders kept per tier and size for its median.
const KEEP: usize = 50;

/// A render's size: what its time depends on.
pub type Size = (Tier, u32, u32, u32);

fn size(r: &RenderRequest) -> Size {
    (r.tier, r.width, r.out_rows(), r.samples)
}

fn samples(r: &RenderRequest) -> f64 {
    r.sample_count() as f64
}

fn median(v: impl Iterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = v.collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

/// The recent renders' device times, by tier and size, to estimate from.
#[derive(Default)]
pub struct Estimates {
    by_size: Mutex<HashMap<Size, VecDeque<i64>>>,
}

impl Estimates {
    /// Notes a render that took `device_ms`.
    pub fn note(&self, r: &RenderRequest, device_ms: i64) {
        self.note_size(size(r), device_ms);
    }

    /// Notes a render of this tier, width, height and samples per axis that took `device_ms`.
    pub fn note_size(&self, size: Size, device_ms: i64) {
        let mut m = self.by_size.lock().unwrap_or_else(|p| p.into_inner());
        let q = m.entry(size).or_default();
        if q.len() == KEEP {
            q.pop_front();
        }
        q.push_back(device_ms.max(0));
    }

    /// The device-milliseconds `r` is expected to take (before its tier's weight).
    pub fn device_ms(&self, r: &RenderRequest, cfg: &CostsConfig) -> f64 {
        let m = self.by_size.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ms) = m.get(&size(r)).and_then(|q| median(q.iter().map(|&ms| ms as f64))) {
            return ms;
        }
        // The tier's other sizes, per sample.
        let per_sample = median(m.iter().filter(|(k, _)| k.0 == r.tier).flat_map(|((_, w, h, s), q)| {
            let n = f64::from(*w) * f64::from(*h) * f64::from(*s) * f64::from(*s);
            q.iter().map(move |&ms| ms as f64 / n.max(1.0))
        }));
        match per_sample {
            Some(rate) => rate * samples(r),
            None => cfg.first_estimate_seconds * 1000.0,
        }
    }
}

/// A budget check holds its token's lock until what it let through is stored, so two submits of
/// one token cannot both pass on the same room.
#[derive(Default)]
pub struct BudgetLocks {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl BudgetLocks {
    /// Takes `client`'s lock.
    pub async fn lock(&self, client: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut m = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            // Locks nobody holds or waits on go, so the map stays as small as the tokens in use.
            m.retain(|_, l| Arc::strong_count(l) > 1);
            m.entry(client.to_owned()).or_default().clone()
        };
        lock.lock_owned().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> i64 {
        s.parse::<Timestamp>().unwrap().as_millisecond()
    }

    #[test]
    fn periods_begin_and_end_at_utc_midnights() {
        let now = ms("2026-12-09T15:30:00Z"); // a Wednesday
        assert_eq!(Period::Day.bounds(now), (ms("2026-12-09T00:00:00Z"), ms("2026-12-10T00:00:00Z")));
        assert_eq!(Period::Week.bounds(now), (ms("2026-12-07T00:00:00Z"), ms("2026-12-14T00:00:00Z")));
        assert_eq!(Period::Month.bounds(now), (ms("2026-12-01T00:00:00Z"), ms("2027-01-01T00:00:00Z")));
        let monday = ms("2026-12-07T00:00:00Z");
        assert_eq!(Period::Week.bounds(monday), (monday, ms("2026-12-14T00:00:00Z")));
        assert_eq!("week".parse::<Period>(), Ok(Period::Week));
        assert!("fortnight".parse::<Period>().unwrap_err().contains("day, week or month"));
    }

    fn req(tier: Tier, w: u32) -> RenderRequest {
        RenderRequest {
            model: "cppn".into(),
            prompt: "p".into(),
            seed: 1,
            tier,
            width: w,
            height: w,
            samples: 1,
            watermark: false,
            dither: false,
            tile: None,
        }
    }

    #[test]
    fn estimates_take_the_median_of_the_size_then_scale_the_tier() {
        let cfg = CostsConfig::default();
        let e = Estimates::default();
        assert_eq!(e.device_ms(&req(Tier::Final, 64), &cfg), 2000.0, "nothing rendered yet");
        for ms in [100, 300, 200, 10_000] {
            e.note(&req(Tier::Final, 64), ms);
        }
        assert_eq!(e.device_ms(&req(Tier::Final, 64), &cfg), 250.0);
        // Twice the side: four times the samples.
        assert_eq!(e.device_ms(&req(Tier::Final, 128), &cfg), 1000.0);
        assert_eq!(e.device_ms(&req(Tier::Print, 64), &cfg), 2000.0, "another tier knows nothing");
        for _ in 0..KEEP {
            e.note(&req(Tier::Final, 64), 40);
        }
        assert_eq!(e.device_ms(&req(Tier::Final, 64), &cfg), 40.0, "only the recent ones count");
    }
}
