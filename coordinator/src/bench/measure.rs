//! What the benchmark compares against and how it splits CPU time: the baseline (a plain in-memory f32
//! sum of the same gradients) and CPU seconds per group of named threads (coordinator runtime versus
//! simulated workers' runtime, which share this machine's cores).

use std::time::{Duration, Instant};

/// The baseline sums for at least this long (repeating the meta-batch), so that a 10k layout's
/// microsecond sums still give a steady rate.
const MIN_BASELINE: Duration = Duration::from_millis(200);

/// Bytes per second of the simplest reduction of a meta-batch: `tasks` gradients added, element by
/// element, into one f32 accumulator on one thread — no network, no validation, no ordering, no f64.
pub fn f32_sum_rate(gradient: &[f32], tasks: usize) -> f64 {
    let mut acc = vec![0.0f32; gradient.len()];
    let bytes_per_round = (tasks * gradient.len() * 4) as f64;
    let started = Instant::now();
    let mut rounds = 0u64;
    while rounds == 0 || started.elapsed() < MIN_BASELINE {
        for _ in 0..tasks.max(1) {
            for (a, g) in acc.iter_mut().zip(std::hint::black_box(gradient)) {
                *a += *g;
            }
        }
        rounds += 1;
    }
    std::hint::black_box(&acc);
    bytes_per_round * rounds as f64 / started.elapsed().as_secs_f64()
}

/// CPU seconds (user + system) so far of this process's threads whose name starts with `prefix` (Linux
/// `/proc/self/task`; 0 elsewhere). Resolution: one clock tick (10 ms).
pub fn thread_cpu_seconds(prefix: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0.0 };
    // SAFETY: sysconf reads a constant; no memory is involved.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut total = 0u64;
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
        // `pid (comm) state ...`: the name may hold spaces or parentheses; the fields follow the last ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        if !stat[open + 1..close].starts_with(prefix) {
            continue;
        }
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // After the name: state is field 3 of stat(5), utime 14 and stime 15, i.e. indices 11 and 12 here.
        let parse = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        total += parse(11) + parse(12);
    }
    total as f64 / ticks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_named_thread_is_counted_and_others_are_not() {
        let spin = std::thread::Builder::new()
            .name("mt-cputest".into())
            .spawn(|| {
                // Spin until the thread's own CPU time shows 50 ms (on a loaded machine that takes
                // longer than 50 ms of wall time; give up after 20 s).
                let t = Instant::now();
                let mut x = 0u64;
                let mut seen = 0.0;
                while seen < 0.05 && t.elapsed() < Duration::from_secs(20) {
                    for _ in 0..100_000 {
                        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                    }
                    seen = thread_cpu_seconds("mt-cputest");
                }
                seen
            })
            .expect("spawn");
        let seen = spin.join().expect("join");
        assert!(seen >= 0.05, "a thread spinning for 20 s shows only {seen} s of CPU");
        assert_eq!(thread_cpu_seconds("no-such-thread-name"), 0.0);
    }

    #[test]
    fn the_baseline_rate_is_positive_and_finite() {
        let r = f32_sum_rate(&[1.0; 1000], 3);
        assert!(r.is_finite() && r > 0.0);
    }
}
