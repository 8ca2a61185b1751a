//! How many worker threads to use by default: one per physical core the process may run on.
//! Two hyper-threads of a core share its FMA units and load ports, and the kernels here are
//! limited by those (or by memory), so a second thread per core adds contention, not speed.

use std::collections::HashSet;

/// Physical cores among the CPUs this process may use (Linux sysfs; elsewhere, or when the
/// topology is unreadable, the available parallelism).
pub fn physical_cores() -> usize {
    let avail = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let allowed = allowed_cpus();
    let mut cores = HashSet::new();
    for cpu in &allowed {
        let base = format!("/sys/devices/system/cpu/cpu{cpu}/topology");
        let pkg = std::fs::read_to_string(format!("{base}/physical_package_id"));
        let core = std::fs::read_to_string(format!("{base}/core_id"));
        match (pkg, core) {
            (Ok(p), Ok(c)) => {
                cores.insert((p.trim().to_string(), c.trim().to_string()));
            }
            _ => return avail,
        }
    }
    if cores.is_empty() {
        avail
    } else {
        cores.len().min(avail).max(1)
    }
}

/// CPU numbers in this process's affinity mask (from /proc/self/status), or 0..available.
fn allowed_cpus() -> Vec<usize> {
    let parse = || -> Option<Vec<usize>> {
        let s = std::fs::read_to_string("/proc/self/status").ok()?;
        let list = s
            .lines()
            .find(|l| l.starts_with("Cpus_allowed_list:"))?
            .split(':')
            .nth(1)?
            .trim()
            .to_string();
        Some(parse_cpu_list(&list))
    };
    parse().filter(|v| !v.is_empty()).unwrap_or_else(|| {
        (0..std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1))
            .collect()
    })
}

/// "0-3,8,10-11" -> [0, 1, 2, 3, 8, 10, 11].
pub fn parse_cpu_list(s: &str) -> Vec<usize> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
                    out.extend(a..=b);
                }
            }
            None => {
                if let Ok(a) = part.parse() {
                    out.push(a);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-3,8,10-11"), vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(parse_cpu_list("5"), vec![5]);
        assert_eq!(parse_cpu_list(""), Vec::<usize>::new());
        let n = physical_cores();
        assert!(n >= 1 && n <= std::thread::available_parallelism().unwrap().get());
    }
}
