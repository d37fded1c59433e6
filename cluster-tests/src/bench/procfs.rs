//! Process CPU time and RSS from `/proc` (Linux only).

/// Clock ticks per second of `/proc/PID/stat` times (USER_HZ, fixed at 100 by the Linux ABI).
pub const USER_HZ: f64 = 100.0;

/// CPU seconds (user + system, all threads) a process has used so far.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_cpu(&stat)
}

/// System (kernel) CPU seconds, all threads, a process has used so far: the part of
/// [`cpu_seconds`] spent in system calls and in the softirq work charged to them (on loopback
/// that includes the receiving peer's TCP processing).
pub fn sys_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_times(&stat).map(|(_, sys)| sys)
}

/// CPU seconds of this process.
pub fn self_cpu_seconds() -> Option<f64> {
    cpu_seconds(std::process::id())
}

/// Parses utime + stime out of a `/proc/PID/stat` line.
pub fn parse_stat_cpu(stat: &str) -> Option<f64> {
    parse_stat_times(stat).map(|(user, sys)| user + sys)
}

/// Parses (utime, stime) in seconds out of a `/proc/PID/stat` line.
pub fn parse_stat_times(stat: &str) -> Option<(f64, f64)> {
    // the command name (field 2) may contain spaces and parentheses: split after the last ')'
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime as f64 / USER_HZ, stime as f64 / USER_HZ))
}

/// Resident set size in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status_rss(&status)
}

/// Parses `VmRSS:` out of `/proc/PID/status`.
pub fn parse_status_rss(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Busy CPU seconds of the whole machine so far (all cores; `/proc/stat` minus idle and
/// iowait), to tell how much else ran during a measurement.
pub fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_machine_busy(&stat)
}

/// Parses the busy ticks of the `cpu` line of `/proc/stat`.
pub fn parse_machine_busy(stat: &str) -> Option<f64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user)
    let busy = v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)? + v.get(7).unwrap_or(&0);
    Some(busy as f64 / USER_HZ)
}

/// CPU seconds summed over several processes (`None` if any is gone).
pub fn cpu_sum(pids: &[u32]) -> Option<f64> {
    pids.iter().map(|p| cpu_seconds(*p)).sum()
}

/// System CPU seconds summed over several processes (`None` if any is gone).
pub fn sys_cpu_sum(pids: &[u32]) -> Option<f64> {
    pids.iter().map(|p| sys_cpu_seconds(*p)).sum()
}

/// RSS summed over several processes, KiB.
pub fn rss_sum(pids: &[u32]) -> Option<u64> {
    pids.iter().map(|p| rss_kib(*p)).sum()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_stat_with_odd_command_names() {
        let line = "1234 (node (x) y) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 11 0";
        assert_eq!(parse_stat_cpu(line), Some(3.0));
    }

    #[test]
    fn parses_rss() {
        let s = "Name:\thearth\nVmPeak:\t 100 kB\nVmRSS:\t   20480 kB\nThreads: 3\n";
        assert_eq!(parse_status_rss(s), Some(20480));
    }

    #[test]
    fn parses_machine_busy() {
        let s = "cpu  100 5 50 1000 20 3 2 10 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n";
        assert_eq!(parse_machine_busy(s), Some(1.7));
    }

    #[test]
    fn reads_own_process() {
        assert!(self_cpu_seconds().is_some());
        assert!(rss_kib(std::process::id()).unwrap() > 0);
    }
}
