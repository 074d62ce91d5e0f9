//! Measurement. Every request's latency goes into hdrhistograms in
//! microseconds: overall, per kind, per payer shard, and per shard pair for
//! cross-shard requests. Requests that complete during the warm-up count in
//! the timeline only. The timeline counts, per second and per payer shard,
//! the transfers accepted.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::Kind;

/// Highest latency recorded exactly: 10 minutes. Longer ones are recorded
/// as 10 minutes (and a request that slow has failed anyway).
pub const MAX_LATENCY_US: u64 = 600_000_000;
/// Three significant digits: 0.1% resolution at every magnitude.
pub const SIGNIFICANT_DIGITS: u8 = 3;

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, SIGNIFICANT_DIGITS).expect("valid bounds")
}

/// A histogram of one second of the timeline: two significant digits keep
/// it to a few KiB, so an hour of seconds fits.
fn second_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 2).expect("valid bounds")
}

/// What a response meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// A new transfer was accepted (201 completed, 202 pending, or 422 when
    /// the payee's shard refused the credit and the debit was undone).
    Accepted,
    /// An idempotent replay of an earlier answer, or a 409 for a concurrent
    /// duplicate: the system did what it must.
    Replayed,
    /// A refusal the traffic expects: insufficient funds, a changed body
    /// under a used key, a fraud block.
    Declined,
    /// Anything else: 5xx, a connection error, an unexpected 4xx, or a
    /// replay that did not match.
    Error,
    /// 401, or a 403 of the auth checks: an error, counted on its own too.
    Unauthorized,
    /// 429 from a rate limit: counted on its own, not as an error (the
    /// system did what its limits say).
    RateLimited,
}

#[derive(Debug, Clone)]
pub struct Sample<'a> {
    pub kind: Kind,
    pub payer_shard: u16,
    pub payee_shard: u16,
    pub latency: Duration,
    /// When the request completed, from the start of the run.
    pub at: Duration,
    pub class: Class,
    /// 0 when no HTTP answer came.
    pub status: u16,
    pub code: &'a str,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counts {
    pub requests: u64,
    pub accepted: u64,
    pub replayed: u64,
    pub declined: u64,
    pub errors: u64,
    /// Of `errors`: refused for want of a valid token or permission.
    #[serde(default)]
    pub unauthorized: u64,
    /// 429s (not in `errors`).
    #[serde(default)]
    pub rate_limited: u64,
}

impl Counts {
    fn add(&mut self, class: Class) {
        self.requests += 1;
        match class {
            Class::Accepted => self.accepted += 1,
            Class::Replayed => self.replayed += 1,
            Class::Declined => self.declined += 1,
            Class::Error => self.errors += 1,
            Class::Unauthorized => {
                self.errors += 1;
                self.unauthorized += 1;
            }
            Class::RateLimited => self.rate_limited += 1,
        }
    }
}

pub struct Measured {
    pub all: Histogram<u64>,
    pub kinds: BTreeMap<Kind, Histogram<u64>>,
    pub shards: BTreeMap<u16, Histogram<u64>>,
    pub pairs: BTreeMap<(u16, u16), Histogram<u64>>,
    pub counts: Counts,
    pub counts_by_kind: BTreeMap<Kind, Counts>,
    /// (status, code) -> count; status 0 is a transport error.
    pub outcomes: BTreeMap<(u16, String), u64>,
    /// Per second from the start: accepted transfers per payer shard.
    pub timeline: Vec<BTreeMap<u16, u64>>,
    /// Per second: errors.
    pub timeline_errors: Vec<u64>,
    /// Per second: every request completed.
    pub timeline_requests: Vec<u64>,
    /// Per second: the p99 latency of the requests completed in it, in µs
    /// (0 for a second without any).
    pub timeline_p99_us: Vec<u64>,
    /// The latest seconds' latencies, until they close into
    /// `timeline_p99_us` (two significant digits): a request completes at
    /// `at`, which only moves forward, so a second is done once the clock
    /// is a few seconds past it and memory stays flat however long a run.
    open_seconds: BTreeMap<usize, Histogram<u64>>,
    /// Per second: the answers other than accepted transfers, by (status,
    /// code), as in `outcomes`.
    pub timeline_outcomes: Vec<BTreeMap<(u16, String), u64>>,
    /// Completion time of the latest accepted transfer, warm-up included.
    pub last_accepted_at: Option<Duration>,
    /// Requests completed during the warm-up.
    pub warmup: Counts,
    /// Completion time of the last measured request.
    pub last_at: Duration,
}

/// How many of the latest seconds keep their histograms open.
const OPEN_SECONDS: usize = 3;

impl Measured {
    /// Closes the seconds before `before` into their p99s.
    fn close_seconds(&mut self, before: usize) {
        while let Some(entry) = self.open_seconds.first_entry() {
            if *entry.key() >= before {
                break;
            }
            let (second, h) = entry.remove_entry();
            self.timeline_p99_us[second] = h.value_at_quantile(0.99);
        }
    }
}

/// The timeline as it stands during a run (see [`Recorder::series`]).
#[derive(Debug, Clone, Default)]
pub struct Series {
    /// Per second: accepted transfers per payer shard.
    pub accepted: Vec<BTreeMap<u16, u64>>,
    pub errors: Vec<u64>,
    pub requests: Vec<u64>,
    pub p99_us: Vec<u64>,
    /// Per second: the answers other than accepted transfers, by (status,
    /// code).
    pub outcomes: Vec<BTreeMap<(u16, String), u64>>,
}

/// Live figures for the progress line.
#[derive(Debug, Clone, Copy, Default)]
pub struct Live {
    pub requests: u64,
    pub accepted: u64,
    pub errors: u64,
    /// p99 of the requests since the last snapshot, in microseconds.
    pub p99_us: u64,
}

pub struct Recorder {
    warmup: Duration,
    inner: Mutex<(Measured, Histogram<u64>)>,
}

impl Recorder {
    pub fn new(warmup: Duration) -> Recorder {
        Recorder {
            warmup,
            inner: Mutex::new((
                Measured {
                    all: new_histogram(),
                    kinds: BTreeMap::new(),
                    shards: BTreeMap::new(),
                    pairs: BTreeMap::new(),
                    counts: Counts::default(),
                    counts_by_kind: BTreeMap::new(),
                    outcomes: BTreeMap::new(),
                    timeline: Vec::new(),
                    timeline_errors: Vec::new(),
                    timeline_requests: Vec::new(),
                    timeline_p99_us: Vec::new(),
                    open_seconds: BTreeMap::new(),
                    timeline_outcomes: Vec::new(),
                    last_accepted_at: None,
                    warmup: Counts::default(),
                    last_at: Duration::ZERO,
                },
                new_histogram(),
            )),
        }
    }

    pub fn record(&self, s: &Sample) {
        let us = (s.latency.as_micros() as u64).clamp(1, MAX_LATENCY_US);
        let second = s.at.as_secs() as usize;
        let mut guard = self.inner.lock().expect("recorder lock");
        let (m, live) = &mut *guard;
        if m.timeline.len() <= second {
            m.timeline.resize_with(second + 1, BTreeMap::new);
            m.timeline_errors.resize(second + 1, 0);
            m.timeline_requests.resize(second + 1, 0);
            m.timeline_p99_us.resize(second + 1, 0);
            m.timeline_outcomes.resize_with(second + 1, BTreeMap::new);
        }
        m.timeline_requests[second] += 1;
        m.open_seconds
            .entry(second)
            .or_insert_with(second_histogram)
            .saturating_record(us);
        m.close_seconds(second.saturating_sub(OPEN_SECONDS));
        match s.class {
            Class::Accepted => {
                *m.timeline[second].entry(s.payer_shard).or_insert(0) += 1;
                m.last_accepted_at = m.last_accepted_at.max(Some(s.at));
            }
            Class::Error | Class::Unauthorized => m.timeline_errors[second] += 1,
            _ => {}
        }
        if s.class != Class::Accepted || s.status >= 300 {
            *m.timeline_outcomes[second]
                .entry((s.status, s.code.to_string()))
                .or_insert(0) += 1;
        }
        live.saturating_record(us);
        if s.at < self.warmup {
            m.warmup.add(s.class);
            return;
        }
        m.last_at = m.last_at.max(s.at);
        m.counts.add(s.class);
        m.counts_by_kind.entry(s.kind).or_default().add(s.class);
        if s.class != Class::Accepted || s.status >= 300 {
            *m.outcomes
                .entry((s.status, s.code.to_string()))
                .or_insert(0) += 1;
        }
        m.all.saturating_record(us);
        m.kinds
            .entry(s.kind)
            .or_insert_with(new_histogram)
            .saturating_record(us);
        m.shards
            .entry(s.payer_shard)
            .or_insert_with(new_histogram)
            .saturating_record(us);
        if s.payer_shard != s.payee_shard {
            m.pairs
                .entry((s.payer_shard, s.payee_shard))
                .or_insert_with(new_histogram)
                .saturating_record(us);
        }
    }

    /// Totals so far, and the p99 since the last call.
    pub fn live(&self) -> Live {
        let mut guard = self.inner.lock().expect("recorder lock");
        let (m, live) = &mut *guard;
        let p99_us = if live.is_empty() {
            0
        } else {
            live.value_at_quantile(0.99)
        };
        live.reset();
        let c = m.counts;
        let w = m.warmup;
        Live {
            requests: c.requests + w.requests,
            accepted: c.accepted + w.accepted,
            errors: c.errors + w.errors,
            p99_us,
        }
    }

    /// Totals so far (the p99 left at 0), without the reset `live` makes.
    pub fn totals(&self) -> Live {
        let guard = self.inner.lock().expect("recorder lock");
        let (c, w) = (guard.0.counts, guard.0.warmup);
        Live {
            requests: c.requests + w.requests,
            accepted: c.accepted + w.accepted,
            errors: c.errors + w.errors,
            p99_us: 0,
        }
    }

    /// The per-second series so far, for the live view: the seconds still
    /// open give the p99 of what they hold yet.
    pub fn series(&self) -> Series {
        let guard = self.inner.lock().expect("recorder lock");
        let m = &guard.0;
        let mut p99_us = m.timeline_p99_us.clone();
        for (second, h) in &m.open_seconds {
            if let Some(slot) = p99_us.get_mut(*second) {
                *slot = h.value_at_quantile(0.99);
            }
        }
        Series {
            accepted: m.timeline.clone(),
            errors: m.timeline_errors.clone(),
            requests: m.timeline_requests.clone(),
            p99_us,
            outcomes: m.timeline_outcomes.clone(),
        }
    }

    /// When the latest accepted transfer completed, from the start of the
    /// run.
    pub fn last_accepted_at(&self) -> Option<Duration> {
        self.inner.lock().expect("recorder lock").0.last_accepted_at
    }

    pub fn finish(self) -> Measured {
        let mut m = self.inner.into_inner().expect("recorder lock").0;
        m.close_seconds(usize::MAX);
        m
    }
}

/// The time since `start`, for `Sample::at`.
pub fn since(start: Instant) -> Duration {
    start.elapsed()
}
