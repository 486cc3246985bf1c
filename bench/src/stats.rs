//! What every benchmark measures with: medians and percentiles, a phase's figures, and the
//! readings `/proc` gives (CPU time for the machine and the process, each thread's time on a CPU
//! and waiting for one, a process's memory).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::Context;

/// One phase's figures.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Figures {
    pub(crate) per_second: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    /// CPU milliseconds per operation, whole machine and this process (Linux; else NaN).
    pub(crate) cpu: CpuTime,
    /// This process's threads' time per operation, by kind (Linux; else NaN).
    pub(crate) threads: ThreadTimes,
}

impl Figures {
    /// `  cpu 0.84 ms/op (machine), 0.61 in this process`, or nothing where it is unknown.
    pub(crate) fn cpu_line(&self, op: &str) -> String {
        if self.cpu.machine_ms.is_nan() {
            return String::new();
        }
        format!("  cpu {:.3} ms/{op} (machine), {:.3} in kiln", self.cpu.machine_ms, self.cpu.process_ms)
    }

    /// `    threads, ms/job running (waiting for a CPU): runtime 0.250 (0.230), …` on a line
    /// of its own, or nothing where it is unknown.
    pub(crate) fn threads_line(&self, op: &str) -> String {
        let t = &self.threads;
        if t.run_ms.iter().all(|v| v.is_nan()) {
            return String::new();
        }
        let kinds = THREAD_KINDS.iter().map(|(label, _)| *label).chain(["other"]);
        let each: Vec<String> =
            kinds.enumerate().map(|(i, k)| format!("{k} {:.3} ({:.3})", t.run_ms[i], t.wait_ms[i])).collect();
        format!("\n      threads, ms/{op} running (waiting for a CPU): {}", each.join(", "))
    }

    /// `  1234/s  p50 1.00 ms  p99 2.00 ms  cpu …`: one run's line.
    pub(crate) fn run_line(&self, op: &str) -> String {
        format!("{:>6.0}/s  p50 {:.2} ms  p99 {:.2} ms{}", self.per_second, self.p50_ms, self.p99_ms, self.cpu_line(op))
    }

    /// `1234/s, p50 1.00 ms, p99 2.00 ms`: the medians' line.
    pub(crate) fn summary(&self) -> String {
        format!("{:.0}/s, p50 {:.2} ms, p99 {:.2} ms", self.per_second, self.p50_ms, self.p99_ms)
    }

    /// Figures measured per request, with `k` jobs to a request on average, as rate and CPU per
    /// job (the latency stays the request's: from its submit to its last job's end).
    pub(crate) fn per_job(self, k: f64) -> Figures {
        Figures {
            per_second: self.per_second * k,
            cpu: CpuTime { machine_ms: self.cpu.machine_ms / k, process_ms: self.cpu.process_ms / k },
            threads: ThreadTimes {
                run_ms: self.threads.run_ms.map(|v| v / k),
                wait_ms: self.threads.wait_ms.map(|v| v / k),
            },
            ..self
        }
    }
}

/// CPU time: the whole machine's busy time (every process: the farm, its database and broker,
/// the load) and this process's, in milliseconds. Per job, it says whether a change saved work
/// or only moved the waiting, and how near the machine is to its bound (cores ÷ CPU per job).
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuTime {
    pub(crate) machine_ms: f64,
    pub(crate) process_ms: f64,
}

/// `/proc` counts in USER_HZ, which Linux fixes at 100 for user space.
pub(crate) const MS_PER_TICK: f64 = 10.0;

impl CpuTime {
    /// Now, from `/proc/stat` (busy: user, nice, system, irq, softirq; not idle, iowait or
    /// steal) and `/proc/self/stat` (utime, stime). NaN where `/proc` is not there.
    pub(crate) fn now() -> CpuTime {
        let machine = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            let f: Vec<f64> = s.lines().next()?.split_whitespace().skip(1).map_while(|v| v.parse().ok()).collect();
            Some(f.get(..3)?.iter().sum::<f64>() + f.get(5..7)?.iter().sum::<f64>())
        });
        let process = std::fs::read_to_string("/proc/self/stat").ok().and_then(|s| {
            // After the command name, which may hold spaces: state is field 3, utime 14, stime 15.
            let f: Vec<&str> = s.get(s.rfind(')')? + 1..)?.split_whitespace().collect();
            Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
        });
        CpuTime {
            machine_ms: machine.map_or(f64::NAN, |t| t * MS_PER_TICK),
            process_ms: process.map_or(f64::NAN, |t| t * MS_PER_TICK),
        }
    }

    /// Per operation since `start`, over `n` operations.
    pub(crate) fn per_op_since(start: CpuTime, n: usize) -> CpuTime {
        let now = CpuTime::now();
        let n = n.max(1) as f64;
        CpuTime {
            machine_ms: (now.machine_ms - start.machine_ms) / n,
            process_ms: (now.process_ms - start.process_ms) / n,
        }
    }
}

/// The kinds of thread the farm's time is split into, by the start of the thread's name
/// (`/proc/self/task/*/comm`); the rest count as "other".
pub const THREAD_KINDS: [(&str, &str); 3] = [
    // The async runtime: HTTP both ways (the farm's and the load's), tiny renders, the rest.
    ("runtime", "tokio-rt-worker"),
    // SQLite's connections, each on a thread of its own: the writer and the readers.
    ("database", "sqlx-sqlite-wor"),
    // The asset store's landing thread: scratch files, renames, syncs.
    ("assets", "kiln-assets"),
];

/// The kinds [`ThreadTimes`] counts: [`THREAD_KINDS`], then "other".
pub const KINDS: usize = THREAD_KINDS.len() + 1;

/// Where one kind of thread's time went: on a CPU, and ready but waiting for one. Time spent
/// waiting says a thread was held up by the others, not by its own work: on a full machine a
/// serial stage (the database writer) waits for a CPU as long as it runs.
#[derive(Debug, Clone, Copy)]
pub struct ThreadTimes {
    /// Milliseconds on a CPU, by [`THREAD_KINDS`] and then "other".
    pub run_ms: [f64; KINDS],
    /// Milliseconds ready to run but waiting for a CPU, the same way.
    pub wait_ms: [f64; KINDS],
}

/// Each thread of this process at one moment, by id: its kind ([`thread_kind`]), nanoseconds
/// on a CPU and waiting for one (`/proc/self/task/*/schedstat`).
pub type ThreadSnapshot = std::collections::HashMap<u64, (usize, u64, u64)>;

/// This process's threads now.
pub fn thread_snapshot() -> ThreadSnapshot {
    let mut out = std::collections::HashMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return out };
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else { continue };
        let (Ok(comm), Ok(stat)) =
            (std::fs::read_to_string(task.path().join("comm")), std::fs::read_to_string(task.path().join("schedstat")))
        else {
            continue;
        };
        if let Some((run, wait)) = parse_schedstat(&stat) {
            out.insert(tid, (thread_kind(comm.trim_end()), run, wait));
        }
    }
    out
}

/// A thread's kind by its name: the index into [`THREAD_KINDS`], or its length for "other".
pub fn thread_kind(comm: &str) -> usize {
    THREAD_KINDS.iter().position(|(_, prefix)| comm.starts_with(prefix)).unwrap_or(THREAD_KINDS.len())
}

/// `/proc/*/schedstat`: nanoseconds on a CPU, nanoseconds waiting for one, time slices.
pub fn parse_schedstat(s: &str) -> Option<(u64, u64)> {
    let mut f = s.split_whitespace().map(str::parse::<u64>);
    Some((f.next()?.ok()?, f.next()?.ok()?))
}

impl ThreadTimes {
    /// Per operation over `n` since `start` ([`thread_snapshot`]). A thread that ended meanwhile
    /// is not counted; one that began counts whole. NaN where `/proc` has no threads to read.
    pub fn per_op_since(start: &ThreadSnapshot, n: usize) -> ThreadTimes {
        let now = thread_snapshot();
        if now.is_empty() {
            return ThreadTimes { run_ms: [f64::NAN; KINDS], wait_ms: [f64::NAN; KINDS] };
        }
        let mut t = ThreadTimes { run_ms: [0.0; KINDS], wait_ms: [0.0; KINDS] };
        let n = n.max(1) as f64;
        for (tid, (kind, run, wait)) in now {
            let (run0, wait0) = start.get(&tid).map_or((0, 0), |(_, r, w)| (*r, *w));
            t.run_ms[kind] += run.saturating_sub(run0) as f64 / 1e6 / n;
            t.wait_ms[kind] += wait.saturating_sub(wait0) as f64 / 1e6 / n;
        }
        t
    }
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub(crate) fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    percentile(&xs, 0.5)
}

/// Each figure's median over runs.
pub(crate) fn medians<'a>(runs: impl Iterator<Item = &'a Figures> + Clone) -> Figures {
    let m = |f: fn(&Figures) -> f64| median(runs.clone().map(f).collect());
    Figures {
        per_second: m(|f| f.per_second),
        p50_ms: m(|f| f.p50_ms),
        p99_ms: m(|f| f.p99_ms),
        cpu: CpuTime { machine_ms: m(|f| f.cpu.machine_ms), process_ms: m(|f| f.cpu.process_ms) },
        threads: ThreadTimes {
            run_ms: std::array::from_fn(|i| median(runs.clone().map(|f| f.threads.run_ms[i]).collect())),
            wait_ms: std::array::from_fn(|i| median(runs.clone().map(|f| f.threads.wait_ms[i]).collect())),
        },
    }
}

/// Runs `n` operations over `concurrency` clients; each returns its latency in seconds.
pub(crate) async fn drive<F, Fut>(n: usize, concurrency: usize, op: F) -> anyhow::Result<Figures>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<f64>> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let cpu = CpuTime::now();
    let threads = thread_snapshot();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (op, next) = (op.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= n {
                    return Ok::<_, anyhow::Error>(lat);
                }
                lat.push(op(i).await?);
            }
        }));
    }
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await.context("a load task panicked")??);
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = CpuTime::per_op_since(cpu, n);
    let threads = ThreadTimes::per_op_since(&threads, n);
    all.sort_by(f64::total_cmp);
    Ok(Figures {
        per_second: n as f64 / wall,
        p50_ms: percentile(&all, 0.5) * 1e3,
        p99_ms: percentile(&all, 0.99) * 1e3,
        cpu,
        threads,
    })
}

/// A `kB` line of `/proc/{pid}/status` (`VmRSS:`, `VmHWM:`…) in MiB; 0 where there is none.
pub(crate) fn proc_status_mib(pid: &str, key: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// CPU seconds (user + system) a process has used, from /proc/PID/stat (USER_HZ is 100 on Linux).
pub(crate) fn cpu_seconds(pid: &str) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').map(|(_, r)| r).context("a malformed /proc stat")?;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 =
        f.get(11).and_then(|u| u.parse().ok()).unwrap_or(0.0) + f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    Ok(ticks / 100.0)
}
