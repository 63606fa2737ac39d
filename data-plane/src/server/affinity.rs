//! Binds each proxy worker thread to a CPU of its own (`--cpu-affinity auto`).
//!
//! The kernel moves a thread to another CPU mostly when it wakes, so two workers that happen to
//! share a CPU can stay together for a hundred milliseconds or more, taking turns of a scheduler
//! tick (4 ms) while another CPU runs something else, and every request on them waits those
//! turns out. Bound one per CPU, two workers never share one. The cost: a bound worker cannot
//! leave a CPU that another busy process shares with it. Off by default (README, Performance).
//!
//! Only when the workers match the CPUs this process may use one for one (the default worker
//! count): with fewer workers than CPUs, binding would keep them off CPUs that are free, and
//! with more, some would share a CPU for good.

#[cfg(target_os = "linux")]
use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
#[cfg(target_os = "linux")]
use nix::unistd::Pid;

/// The CPUs the calling thread may run on, in ascending order.
#[cfg(target_os = "linux")]
pub fn allowed_cpus() -> std::io::Result<Vec<usize>> {
    let set = sched_getaffinity(Pid::from_raw(0))?;
    Ok((0..CpuSet::count())
        .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
        .collect())
}

/// The CPU of each of `workers` workers, or `None` when they are not to be bound: binding is
/// off, there is one worker, or the workers do not match `allowed` one for one.
pub fn plan(enabled: bool, workers: usize, allowed: &[usize]) -> Option<Vec<usize>> {
    (enabled && workers > 1 && workers == allowed.len()).then(|| allowed.to_vec())
}

/// Binds the calling thread to `cpu`.
#[cfg(target_os = "linux")]
pub fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu)?;
    sched_setaffinity(Pid::from_raw(0), &set)?;
    Ok(())
}

/// Elsewhere than on Linux, workers run unbound.
#[cfg(not(target_os = "linux"))]
pub fn allowed_cpus() -> std::io::Result<Vec<usize>> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "CPU binding is Linux only",
    ))
}

#[cfg(not(target_os = "linux"))]
pub fn pin_current_thread(_cpu: usize) -> std::io::Result<()> {
    allowed_cpus().map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_are_bound_only_one_for_one_with_the_allowed_cpus() {
        assert_eq!(plan(true, 2, &[0, 1]), Some(vec![0, 1]));
        assert_eq!(plan(true, 3, &[2, 5, 7]), Some(vec![2, 5, 7]));
        assert_eq!(plan(false, 2, &[0, 1]), None);
        assert_eq!(plan(true, 1, &[0]), None);
        assert_eq!(plan(true, 2, &[0, 1, 2, 3]), None);
        assert_eq!(plan(true, 4, &[0, 1]), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_thread_bound_to_an_allowed_cpu_runs_only_there() {
        let allowed = allowed_cpus().unwrap();
        assert!(!allowed.is_empty());
        let last = *allowed.last().unwrap();
        let seen = std::thread::spawn(move || {
            pin_current_thread(last).unwrap();
            allowed_cpus().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(seen, vec![last]);
        // The binding was the spawned thread's only.
        assert_eq!(allowed_cpus().unwrap(), allowed);
    }
}
