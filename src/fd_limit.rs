//! File-descriptor headroom: at start the soft `RLIMIT_NOFILE` is raised to the hard limit, and
//! when it still cannot hold `max_connections` sockets plus [`RESERVED_FDS`] (database, Redis,
//! listeners, files), the node cap is lowered to fit, with a warning naming both numbers. Without
//! this a full node would fail `accept` (and database connects) with EMFILE instead of refusing
//! clients cleanly.

use tracing::{debug, warn};

/// Descriptors kept free for everything but client connections.
pub const RESERVED_FDS: u64 = 256;

/// Raises the soft open-file limit to the hard limit (where the system allows) and returns the
/// soft limit in force afterwards.
#[allow(unsafe_code, clippy::useless_conversion)] // rlim_t is u64 on 64-bit targets only
fn raise_nofile_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read or write the `rlimit` structs passed by pointer,
    // which are valid, initialised locals that outlive both calls.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            // an infinite hard limit may be refused for the soft one: keep the old soft limit
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return Ok(u64::from(lim.rlim_max));
            }
        }
    }
    Ok(u64::from(lim.rlim_cur))
}

/// The node cap that fits `open_files` descriptors: `max_connections` when it and the reserve
/// fit, else what is left after the reserve (half of `open_files` when even the reserve does
/// not fit comfortably), at least 1.
pub fn fit_connections(max_connections: usize, open_files: u64) -> usize {
    let wanted = (max_connections as u64).saturating_add(RESERVED_FDS);
    if open_files >= wanted {
        return max_connections;
    }
    let fit = if open_files > 2 * RESERVED_FDS {
        open_files - RESERVED_FDS
    } else {
        open_files / 2
    };
    usize::try_from(fit)
        .unwrap_or(usize::MAX)
        .clamp(1, max_connections)
}

/// Raises the open-file limit and returns the node cap to use for `max_connections`, warning
/// when it had to be lowered.
pub fn effective_max_connections(max_connections: usize) -> usize {
    let open_files = match raise_nofile_limit() {
        Ok(n) => n,
        Err(e) => {
            warn!(error = %e, max_connections, "cannot read the open-file limit (RLIMIT_NOFILE); keeping max_connections");
            return max_connections;
        }
    };
    let fit = fit_connections(max_connections, open_files);
    if fit < max_connections {
        warn!(
            open_file_limit = open_files,
            max_connections,
            reserved = RESERVED_FDS,
            effective_max_connections = fit,
            "the open-file limit {open_files} is below max_connections {max_connections} + {RESERVED_FDS} reserved descriptors; serving at most {fit} connections (raise `ulimit -n` / LimitNOFILE to lift this)"
        );
    } else {
        debug!(
            open_file_limit = open_files,
            max_connections, "open-file limit fits"
        );
    }
    fit
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fits_the_cap_to_the_limit() {
        assert_eq!(fit_connections(10_000, 1_048_576), 10_000);
        assert_eq!(fit_connections(10_000, 10_256), 10_000);
        assert_eq!(fit_connections(10_000, 10_255), 9_999);
        assert_eq!(fit_connections(10_000, 1024), 768);
        assert_eq!(fit_connections(10_000, 300), 150);
        assert_eq!(fit_connections(10_000, 1), 1);
        assert_eq!(fit_connections(100, 1024), 100);
    }

    #[test]
    fn the_limit_can_be_read_and_raised() {
        let n = raise_nofile_limit().map_or(0, |n| n);
        assert!(n > 0, "RLIMIT_NOFILE soft limit is readable");
        assert_eq!(effective_max_connections(1), 1);
    }
}
