//! CPU time and memory of the hub process (and of all `postgres` processes beside it), and the
//! CPU time the hypervisor took from this machine, read from /proc, so a report can say where
//! the machine's time went during a run.

use std::path::Path;

/// Linux reports /proc CPU times in USER_HZ ticks, 100 per second on every architecture we run.
const TICKS_PER_SEC: f64 = 100.0;

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Sample {
    /// CPU seconds (user + system) used so far by the hub.
    pub hub_cpu_s: f64,
    /// Resident set size of the hub, KiB.
    pub hub_rss_kib: u64,
    /// CPU seconds used so far by all processes named `postgres`.
    pub postgres_cpu_s: f64,
    /// CPU seconds stolen so far from this (virtual) machine's CPUs by the hypervisor, summed over
    /// the CPUs: time the machine's processes were ready to run but another guest ran instead.
    pub machine_steal_s: f64,
}

fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the full line, 12 and 13 after the name.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_SEC)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn postgres_cpu() -> f64 {
    let Ok(entries) = std::fs::read_dir("/proc") else { return 0.0 };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("comm")).is_ok_and(|c| c.trim() == "postgres"))
        .filter_map(cpu_seconds)
        .sum()
}

/// Steal time of the machine, CPU seconds, from the text of /proc/stat: the eighth value of the
/// `cpu` line (user, nice, system, idle, iowait, irq, softirq, steal).
fn steal_seconds_of(proc_stat: &str) -> Option<f64> {
    let line = proc_stat.lines().find(|l| l.split_whitespace().next() == Some("cpu"))?;
    let steal: f64 = line.split_whitespace().nth(8)?.parse().ok()?;
    Some(steal / TICKS_PER_SEC)
}

fn machine_steal() -> f64 {
    std::fs::read_to_string("/proc/stat").ok().as_deref().and_then(steal_seconds_of).unwrap_or(0.0)
}

/// Samples one process; `None` pid samples nothing of the hub (Postgres is still read).
pub fn sample(hub_pid: Option<u32>) -> Sample {
    Sample {
        hub_cpu_s: hub_pid.and_then(cpu_seconds).unwrap_or(0.0),
        hub_rss_kib: hub_pid.and_then(rss_kib).unwrap_or(0),
        postgres_cpu_s: postgres_cpu(),
        machine_steal_s: machine_steal(),
    }
}

/// CPU seconds used by this load generator itself.
pub fn own_cpu_seconds() -> f64 {
    cpu_seconds(std::process::id()).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::steal_seconds_of;

    #[test]
    fn steal_is_the_eighth_value_of_the_all_cpus_line() {
        let stat = "cpu  4705 150 1120 16250 520 0 33 250 0 0\ncpu0 2000 50 500 8000 260 0 20 200 0 0\nintr 1 2 3\n";
        assert_eq!(steal_seconds_of(stat), Some(2.5));
        // Kernels without the steal column, or no `cpu` line: nothing to report.
        assert_eq!(steal_seconds_of("cpu  4705 150 1120 16250 520 0 33\n"), None);
        assert_eq!(steal_seconds_of("cpu0 1 2 3 4 5 6 7 8\n"), None);
    }
}
