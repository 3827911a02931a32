//! Reading a process's memory and CPU time from /proc (Linux).

/// Memory and CPU of one process.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSample {
    /// Resident set size now, bytes.
    pub rss: u64,
    /// Peak resident set size, bytes.
    pub hwm: u64,
    /// User + system CPU time so far, seconds.
    pub cpu_s: f64,
}

/// Clock ticks per second of /proc/<pid>/stat times (USER_HZ, 100 on Linux).
const TICKS_PER_S: f64 = 100.0;

/// Samples a process; `None` if it is gone or /proc is unreadable.
pub fn sample(pid: u32) -> Option<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|v| v * 1024)
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat: 12 and 13 after ')'.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some(ProcSample {
        rss: kb("VmRSS:"),
        hwm: kb("VmHWM:"),
        cpu_s: (utime + stime) / TICKS_PER_S,
    })
}

/// Wall and CPU time this process spent on one piece of work.
#[derive(Debug, Clone, Copy)]
pub struct Spent {
    /// Elapsed wall time, seconds.
    pub secs: f64,
    /// User + system CPU time of the whole process, seconds (10 ms ticks).
    pub cpu_s: f64,
}

/// Measures [`Spent`] from `start` to `stop`.
#[derive(Debug)]
pub struct Stopwatch {
    began: std::time::Instant,
    cpu_s: f64,
}

impl Stopwatch {
    /// Starts measuring now.
    pub fn start() -> Self {
        Stopwatch {
            began: std::time::Instant::now(),
            cpu_s: own_cpu_s(),
        }
    }

    /// What was spent since `start`.
    pub fn stop(self) -> Spent {
        Spent {
            secs: self.began.elapsed().as_secs_f64(),
            cpu_s: own_cpu_s() - self.cpu_s,
        }
    }
}

fn own_cpu_s() -> f64 {
    sample(std::process::id()).map_or(0.0, |s| s.cpu_s)
}

#[cfg(test)]
mod tests {
    #[test]
    fn samples_this_process() {
        let s = super::sample(std::process::id()).expect("own /proc entry");
        assert!(s.rss > 0 && s.hwm >= s.rss);
    }
}
