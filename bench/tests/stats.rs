//! The benchmarks' `/proc` readings: which kind of thread is which, and their time on a CPU.

use kiln_bench::stats::{THREAD_KINDS, ThreadTimes, parse_schedstat, thread_kind, thread_snapshot};

#[test]
fn a_thread_is_of_the_kind_its_name_starts_with() {
    // Linux cuts a thread's name to 15 bytes: sqlx's "sqlx-sqlite-worker-3" reads so.
    assert_eq!(THREAD_KINDS[thread_kind("sqlx-sqlite-wor")].0, "database");
    assert_eq!(THREAD_KINDS[thread_kind("tokio-rt-worker")].0, "runtime");
    assert_eq!(THREAD_KINDS[thread_kind("kiln-assets")].0, "assets");
    assert_eq!(thread_kind("kiln"), THREAD_KINDS.len(), "the main thread is other");
}

#[test]
fn schedstat_gives_time_on_a_cpu_then_time_waiting_for_one() {
    assert_eq!(parse_schedstat("2790000000 2450000000 102734\n"), Some((2_790_000_000, 2_450_000_000)));
    assert_eq!(parse_schedstat("12 x 3"), None);
    assert_eq!(parse_schedstat(""), None);
}

#[test]
fn this_process_threads_are_counted_by_kind() {
    let start = thread_snapshot();
    assert!(!start.is_empty(), "/proc/self/task lists this thread at least");
    // 50 ms on a CPU, by the thread's own count (on a busy machine that takes longer), on a
    // thread named as the asset store names its own; it stays alive until its time is read.
    let (worked, done) = std::sync::mpsc::channel();
    let spin = std::thread::Builder::new()
        .name("kiln-assets".into())
        .spawn(move || {
            let on_cpu = || {
                let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
                parse_schedstat(&s).unwrap().0
            };
            let until = on_cpu() + 50_000_000;
            let mut x = 0u64;
            while on_cpu() < until {
                for _ in 0..100_000 {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                }
            }
            worked.send(()).unwrap();
            std::thread::park();
            x
        })
        .unwrap();
    done.recv().unwrap();
    let t = ThreadTimes::per_op_since(&start, 10);
    spin.thread().unpark();
    spin.join().unwrap();
    // 50 ms over 10 operations: at least 5 ms each on a CPU, counted as assets. Other tests'
    // asset stores may add a little of theirs; a figure out of all bounds would be one in
    // other units (nanoseconds) or not divided by the operations.
    assert!(t.run_ms[2] >= 5.0, "{t:?}");
    assert!(t.run_ms[2] < 200.0, "{t:?}");
}
