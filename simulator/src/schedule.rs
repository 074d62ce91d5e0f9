//! The open model's arrival schedule. The rate moves linearly within each
//! stage, so the number of arrivals due by time t, N(t), is the integral of
//! the rate; arrival k is due at the t where N(t) = k. Operations are sent
//! at their due time whether or not earlier ones have answered, and their
//! latency is measured from that time, so a stalled system shows up in the
//! latency (coordinated omission corrected, as wrk2 does).

use std::time::Duration;

use crate::scenario::Stage;

#[derive(Debug, Clone)]
pub struct Schedule {
    /// Per stage: start time (s), rate at start, rate at end, length (s),
    /// arrivals due before the stage.
    stages: Vec<(f64, f64, f64, f64, f64)>,
    total: f64,
}

impl Schedule {
    pub fn new(start_rate_per_s: f64, stages: &[Stage]) -> Schedule {
        let mut out = Vec::new();
        let mut t = 0.0;
        let mut due = 0.0;
        let mut rate = start_rate_per_s;
        for s in stages {
            let len = s.duration_s as f64;
            out.push((t, rate, s.target_per_s, len, due));
            due += (rate + s.target_per_s) / 2.0 * len;
            t += len;
            rate = s.target_per_s;
        }
        Schedule {
            stages: out,
            total: due,
        }
    }

    /// Arrivals in the whole schedule.
    pub fn len(&self) -> u64 {
        self.total.floor() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Arrivals due before `t` from the start of the run.
    pub fn due_before(&self, t: Duration) -> u64 {
        let t = t.as_secs_f64();
        let mut due = 0.0;
        for &(start, r0, r1, len, before) in &self.stages {
            if t <= start {
                break;
            }
            let x = (t - start).min(len);
            due = before + r0 * x + (r1 - r0) / (2.0 * len.max(1e-12)) * x * x;
        }
        // Arrival k is due at N(t) = k, so the arrivals due strictly
        // before t are those with k < N(t).
        (due - 1e-9).ceil().max(0.0) as u64
    }

    /// When arrival k is due, from the start of the run; `None` past the
    /// end of the schedule.
    pub fn due(&self, k: u64) -> Option<Duration> {
        let k = k as f64;
        for &(start, r0, r1, len, before) in &self.stages {
            let within = (r0 + r1) / 2.0 * len;
            if k >= before + within {
                continue;
            }
            // Solve r0*x + (r1-r0)/(2 len) * x^2 = k - before for x in [0, len].
            let need = k - before;
            let a = (r1 - r0) / (2.0 * len);
            let x = if a.abs() < 1e-12 {
                need / r0
            } else {
                (-r0 + (r0 * r0 + 4.0 * a * need).max(0.0).sqrt()) / (2.0 * a)
            };
            return Some(Duration::from_secs_f64(start + x.clamp(0.0, len)));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(duration_s: u64, target_per_s: f64) -> Stage {
        Stage {
            duration_s,
            target_per_s,
        }
    }

    #[test]
    fn constant_rate_is_evenly_spaced() {
        let s = Schedule::new(100.0, &[stage(10, 100.0)]);
        assert_eq!(s.len(), 1000);
        assert_eq!(s.due(0), Some(Duration::ZERO));
        assert_eq!(s.due(50).unwrap().as_micros(), 500_000);
        assert_eq!(s.due(999).unwrap().as_micros(), 9_990_000);
        assert_eq!(s.due(1000), None);
    }

    #[test]
    fn arrivals_due_before_a_time_agree_with_their_due_times() {
        let s = Schedule::new(0.0, &[stage(10, 200.0), stage(5, 200.0)]);
        assert_eq!(s.due_before(Duration::ZERO), 0);
        assert_eq!(s.due_before(Duration::from_secs(100)), s.len());
        for ms in (0..15_000).step_by(137) {
            let t = Duration::from_millis(ms);
            let n = s.due_before(t);
            // Arrival n-1 is due before t and arrival n is not.
            if n > 0 {
                assert!(s.due(n - 1).unwrap() < t + Duration::from_micros(1), "{ms}");
            }
            if let Some(next) = s.due(n) {
                assert!(next + Duration::from_micros(1) >= t, "{ms}: {n}");
            }
        }
    }

    #[test]
    fn a_ramp_fills_its_integral() {
        // 0 -> 200/s over 10 s: 1000 arrivals; then 200/s for 5 s: 1000 more.
        let s = Schedule::new(0.0, &[stage(10, 200.0), stage(5, 200.0)]);
        assert_eq!(s.len(), 2000);
        // Half the ramp's arrivals are due by t = 10/sqrt(2).
        let half = s.due(500).unwrap().as_secs_f64();
        assert!((half - 10.0 / 2f64.sqrt()).abs() < 1e-6, "{half}");
        assert!((s.due(1000).unwrap().as_secs_f64() - 10.0).abs() < 1e-9);
        assert!((s.due(1500).unwrap().as_secs_f64() - 12.5).abs() < 1e-9);
        let mut last = Duration::ZERO;
        for k in 0..2000 {
            let t = s.due(k).unwrap();
            assert!(t >= last, "arrival {k} earlier than the one before");
            last = t;
        }
    }
}
