//! What /proc says about the stack's processes (CPU seconds, RSS, whether one has exited),
//! signals, and the services' admin ports.

use std::process::ExitStatus;
use std::time::Duration;

use iotp_core::probe;
use tokio::process::Child;

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The fields of /proc/`pid`/stat after the command name (which is in parentheses and may
/// hold spaces): state first.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')').map(|(_, r)| r)?;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// User + system CPU seconds of a process (0 if it is gone). An exited process that was not
/// waited for yet (a zombie) still tells its total.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Some(fields) = stat_fields(pid) else {
        return 0.0;
    };
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    ticks / clock_ticks()
}

/// CPU seconds the whole machine has been busy since boot, all CPUs together: the first
/// line of /proc/stat less its idle and iowait columns (0 where it cannot be read). Every
/// process is in it: the fleet, Mosquitto, RabbitMQ, the load tool, anything else running.
pub fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().find_map(|l| l.strip_prefix("cpu ")) else {
        return 0.0;
    };
    // user nice system idle iowait irq softirq steal (guest time is inside user already)
    let ticks: Vec<f64> = cpu
        .split_whitespace()
        .take(8)
        .filter_map(|v| v.parse().ok())
        .collect();
    let busy: f64 = ticks
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, t)| t)
        .sum();
    busy / clock_ticks()
}

/// The number after `key` in a `key: value` file of /proc (`status`, `io`), if the file has it.
fn proc_value(file: impl AsRef<std::path::Path>, key: &str) -> Option<u64> {
    std::fs::read_to_string(file)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Voluntary context switches of a process's live threads: how often one of them blocked and
/// had to be woken again (0 if it is gone). Threads that ended are not counted.
pub fn wakeups(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| proc_value(t.path().join("status"), "voluntary_ctxt_switches"))
        .sum()
}

/// Bytes a process caused to be written to storage so far (`write_bytes` of /proc/`pid`/io:
/// files, not sockets; counted when pages are dirtied, before they reach the disk), 0 if it
/// is gone. The store writers' I/O, which does not depend on how fast the machine is.
pub fn disk_written(pid: u32) -> u64 {
    proc_value(format!("/proc/{pid}/io"), "write_bytes").unwrap_or(0)
}

/// Resident set size of a process, bytes (0 if it is gone).
pub fn rss_bytes(pid: u32) -> u64 {
    proc_value(format!("/proc/{pid}/status"), "VmRSS").map_or(0, |kb| kb * 1024)
}

/// Whether the process has exited (a zombie, or gone).
pub fn exited(pid: u32) -> bool {
    stat_fields(pid).is_none_or(|f| f.first().is_some_and(|s| s == "Z"))
}

/// Send `signal` (`TERM`, `KILL`) to `pid`.
pub fn signal(pid: u32, signal: &str) {
    let _ = std::process::Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status();
}

/// Wait for `child` (process `pid`) to exit, `kill -9` it if it has not within `within`;
/// its exit status (`None`: ended by a signal or not waitable) and the CPU seconds it used in
/// all, read before it is reaped.
pub async fn reap(child: &mut Child, pid: u32, within: Duration) -> (Option<ExitStatus>, f64) {
    let deadline = tokio::time::Instant::now() + within;
    let mut killed = false;
    while !exited(pid) {
        if !killed && tokio::time::Instant::now() >= deadline {
            signal(pid, "KILL");
            killed = true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu = cpu_seconds(pid);
    (child.wait().await.ok(), cpu)
}

/// The Prometheus text of the admin port `port`; `None` while it does not answer with 2xx.
pub async fn scrape(port: u16) -> Option<String> {
    probe::get(port, "/metrics")
        .await
        .ok()
        .filter(|r| r.is_success())
        .map(|r| r.body)
}

/// Whether the admin port `port` reports ready.
pub async fn ready(port: u16) -> bool {
    probe::get(port, "/readyz")
        .await
        .is_ok_and(|r| r.is_success())
}

/// A TCP port nothing listens on now (the OS's pick).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_machine_counts_at_least_what_this_thread_spun() {
        let pid = std::process::id();
        let (machine, own) = (machine_busy_seconds(), cpu_seconds(pid));
        let until = std::time::Instant::now() + Duration::from_millis(300);
        let mut x = 0u64;
        while std::time::Instant::now() < until {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(x > 0);
        let (machine, own) = (machine_busy_seconds() - machine, cpu_seconds(pid) - own);
        // Ticks are 10 ms: this process spun for about 0.3 s, and the machine includes it.
        assert!(own > 0.2, "this process: {own} s");
        assert!(
            machine >= own - 0.02,
            "machine {machine} s, this process {own} s"
        );
    }

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let pid = std::process::id();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = std::hint::black_box(x.wrapping_add(i * i));
        }
        assert!(x > 0);
        assert!(rss_bytes(pid) > 1024 * 1024);
        assert!(cpu_seconds(pid) > 0.0);
        // Wake-ups are read off a process of their own: in this one, another test's thread
        // that ends takes its switches out of the sum.
        let mut shell = std::process::Command::new("sh")
            .args(["-c", "sleep 0.05; sleep 0.05; sleep 5"])
            .spawn()
            .expect("sh");
        std::thread::sleep(Duration::from_millis(400));
        let woken = wakeups(shell.id());
        let _ = shell.kill();
        let _ = shell.wait();
        assert!(woken > 0, "waiting for a child is a voluntary switch");
        assert_eq!(rss_bytes(u32::MAX), 0);
        assert!(!exited(pid) && exited(u32::MAX));
    }

    #[test]
    fn a_file_written_counts_as_disk_written() {
        use std::io::Write;
        let pid = std::process::id();
        // Beside the sources: on a disk (a temp directory may be in memory).
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("disk-written-{pid}.tmp"));
        let before = disk_written(pid);
        let mut f = std::fs::File::create(&path).expect("create");
        f.write_all(&vec![7u8; 1 << 20]).expect("write");
        f.sync_all().expect("sync");
        drop(f);
        let after = disk_written(pid);
        let _ = std::fs::remove_file(&path);
        assert!(after >= before + (1 << 20), "{before} → {after}");
        assert_eq!(disk_written(u32::MAX), 0);
    }

    #[tokio::test]
    async fn a_child_that_ignores_sigterm_is_killed_after_the_deadline_and_its_cpu_read() {
        let mut child = tokio::process::Command::new("sh")
            .args([
                "-c",
                "trap '' TERM; i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; sleep 30",
            ])
            .spawn()
            .expect("sh");
        let pid = child.id().expect("pid");
        tokio::time::sleep(Duration::from_millis(300)).await;
        signal(pid, "TERM");
        let (status, cpu) = reap(&mut child, pid, Duration::from_millis(500)).await;
        assert_eq!(status.and_then(|s| s.code()), None, "ended by SIGKILL");
        assert!(cpu > 0.0, "CPU read from the zombie: {cpu}");
    }
}
