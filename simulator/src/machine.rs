//! How busy the whole machine is: every process on it, read from
//! /proc/stat, so a run's report (and the bench's raw baseline) can say
//! whether the CPU or something else held the throughput.

/// The machine's busy and total CPU time so far, in clock ticks, from the
/// first line of /proc/stat (every process, not only this one: the MySQL
/// servers and the other services count). None off Linux.
pub fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    busy_and_total(stat.lines().next()?)
}

/// Busy and total ticks of a `cpu  user nice system idle iowait ...` line:
/// idle and iowait are not busy.
fn busy_and_total(line: &str) -> Option<(u64, u64)> {
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let ticks: Vec<u64> = fields.filter_map(|f| f.parse().ok()).collect();
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3)? + ticks.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// Fewer ticks than this between two readings (0.1 s of one cpu's time
/// each on a 2-cpu machine) say too little to call the machine busy or not.
const MIN_TICKS: u64 = 20;

/// The share of the machine's CPU that was busy between two readings, in
/// 0..=1 (the kernel's iowait count can go down between readings).
pub fn busy_share(before: Option<(u64, u64)>, after: Option<(u64, u64)>) -> Option<f64> {
    let ((b0, t0), (b1, t1)) = (before?, after?);
    (t1 >= t0 + MIN_TICKS).then(|| (b1.saturating_sub(b0) as f64 / (t1 - t0) as f64).min(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_machine_is_busy_for_all_but_idle_and_iowait() {
        let line = "cpu  100 5 45 800 50 0 0 0 0 0";
        assert_eq!(busy_and_total(line), Some((150, 1000)));
        assert_eq!(busy_and_total("cpu0 1 2 3 4"), None, "a single cpu's line");
        assert_eq!(busy_share(Some((150, 1000)), Some((1050, 2000))), Some(0.9));
        assert_eq!(busy_share(Some((150, 1000)), Some((150, 1000))), None);
        assert_eq!(
            busy_share(Some((150, 1000)), Some((160, 1010))),
            None,
            "too few ticks to say"
        );
        assert_eq!(
            busy_share(Some((100, 1000)), Some((200, 1050))),
            Some(1.0),
            "iowait that went down cannot make the machine more than busy"
        );
        assert_eq!(busy_share(None, Some((1, 2))), None);
        if cfg!(target_os = "linux") {
            assert!(machine_ticks().is_some(), "Linux has /proc/stat");
        }
    }
}
