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
    /// CPU seconds used so far by all processes named `postgres`, with their children that
    /// ended (backends and autovacuum workers that exited count in their postmaster).
    pub postgres_cpu_s: f64,
    /// CPU seconds stolen so far from this (virtual) machine's CPUs by the hypervisor, summed over
    /// the CPUs: time the machine's processes were ready to run but another guest ran instead.
    pub machine_steal_s: f64,
}

fn cpu_seconds(pid: u32) -> Option<f64> {
    cpu_seconds_of(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?, false)
}

/// CPU seconds from the text of /proc/<pid>/stat: utime and stime, and with `ended_children`
/// cutime and cstime too (the children it waited for).
fn cpu_seconds_of(stat: &str, ended_children: bool) -> Option<f64> {
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime, stime, cutime and cstime are fields 14 to 17 of the full line, 12 to 15 after the name.
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    let own = field(11)? + field(12)?;
    let children = if ended_children { field(13)? + field(14)? } else { 0.0 };
    Some((own + children) / TICKS_PER_SEC)
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
        .filter_map(|pid| cpu_seconds_of(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?, true))
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
    use super::{cpu_seconds_of, steal_seconds_of};

    #[test]
    fn cpu_time_with_and_without_ended_children() {
        // pid (comm with spaces) state ppid … utime stime cutime cstime …, in ticks of 10 ms.
        let stat = "42 (postgres: a b) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 700 300 20 0 1 0 100 1000 10";
        assert_eq!(cpu_seconds_of(stat, false), Some(3.0));
        assert_eq!(cpu_seconds_of(stat, true), Some(13.0));
        assert_eq!(cpu_seconds_of("42 (short) S 1", false), None);
    }

    #[test]
    fn steal_is_the_eighth_value_of_the_all_cpus_line() {
        let stat = "cpu  4705 150 1120 16250 520 0 33 250 0 0\ncpu0 2000 50 500 8000 260 0 20 200 0 0\nintr 1 2 3\n";
        assert_eq!(steal_seconds_of(stat), Some(2.5));
        // Kernels without the steal column, or no `cpu` line: nothing to report.
        assert_eq!(steal_seconds_of("cpu  4705 150 1120 16250 520 0 33\n"), None);
        assert_eq!(steal_seconds_of("cpu0 1 2 3 4 5 6 7 8\n"), None);
    }
}
