//! The process's file-descriptor limit (`RLIMIT_NOFILE`), raised to its hard limit at
//! start so that `listen.max_connections` fits. The one module with unsafe code: libc's
//! getrlimit/setrlimit, whose only inputs are a resource number and a struct we own.

#![allow(unsafe_code)]

/// The soft `RLIMIT_NOFILE` after raising it to the hard limit; `None` if unlimited or
/// unreadable.
pub(crate) fn raise_nofile_limit() -> Option<u64> {
    let mut limits = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and reads nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limits) } != 0 {
        return None;
    }
    if limits.rlim_cur < limits.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limits.rlim_max,
            rlim_max: limits.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limits.rlim_cur = limits.rlim_max;
        }
    }
    if limits.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    Some(limits.rlim_cur)
}
